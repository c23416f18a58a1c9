"""The builtin paged-KV engine: scheduler, block pool, model runner, sampler, and the mocker."""
