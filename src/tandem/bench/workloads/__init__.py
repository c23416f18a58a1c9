"""What `tandem bench` sends: one module per workload, and the options that pick and shape one.

``request`` (the request a workload yields), ``random_tokens``, ``shared_prefix``, ``multi_turn``
(user sessions that resend their history), ``trace`` (Mooncake-style trace replay and synthesis),
and ``options`` (command-line flags → requests or sessions).
"""
