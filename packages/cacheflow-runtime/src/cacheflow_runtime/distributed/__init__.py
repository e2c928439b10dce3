"""Tensor parallelism across processes: the communicator (NCCL on GPUs, gloo on CPU) and the
set-up of a worker process's group."""

from cacheflow_runtime.distributed.communicator import (
    Communicator,
    GlooCommunicator,
    NcclCommunicator,
    create_communicator,
)
from cacheflow_runtime.distributed.environment import (
    destroy_distributed_environment,
    init_distributed_environment,
)
from cacheflow_runtime.distributed.nccl_library import NcclInfo, NcclLibrary

__all__ = ["Communicator", "GlooCommunicator", "NcclCommunicator", "NcclInfo", "NcclLibrary",
           "create_communicator", "destroy_distributed_environment",
           "init_distributed_environment"]
