"""KV block transfer service: a prefill worker holds finished prompts' KV blocks
(`TransferStore`) and serves them (`KvTransferServer`); a decode worker pulls the blocks it lacks
(`pull_blocks`) over TCP, or through shared memory when both run on one host.
"""

from tandem.transfer.client import PulledBlocks, pull_blocks
from tandem.transfer.metrics import TransferMetrics, default_metrics
from tandem.transfer.server import KvTransferServer, KvTransferServerConfig
from tandem.transfer.store import TransferStore, TransferStoreConfig, TransferStoreStats
from tandem.transfer.wire import PullAck, PullRequest, PullResponse, ShmDone, TransferError, host_id

__all__ = [
    "KvTransferServer",
    "KvTransferServerConfig",
    "PullAck",
    "PullRequest",
    "PullResponse",
    "PulledBlocks",
    "ShmDone",
    "TransferError",
    "TransferMetrics",
    "TransferStore",
    "TransferStoreConfig",
    "TransferStoreStats",
    "default_metrics",
    "host_id",
    "pull_blocks",
]
