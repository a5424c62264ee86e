"""Default OpenMP thread binding for multi-rank (TP x PP) vLLM on CPU when there are fewer NUMA nodes than ranks."""

from __future__ import annotations

import os

from ..errors import TidarError
from .common import plugin_logger

logger = plugin_logger(__name__)
ENV = "VLLM_CPU_OMP_THREADS_BIND"
_ours: str | None = None  # the value this module set (a later engine in the process may need another)


def default_thread_binding(vllm_config) -> None:
    """Split the allowed cores evenly over the local ranks in ``VLLM_CPU_OMP_THREADS_BIND``.

    vllm-cpu's ``auto`` binding puts each rank on its own NUMA node and stops with "Not enough
    allowed NUMA nodes to bind threads of N local CPUWorkers" otherwise (e.g. TP=2 on a 2-core,
    1-node machine). Nothing changes when the user set the variable, on other platforms, with one
    rank, with data parallelism, or when there are enough NUMA nodes. A value this function set
    for an earlier engine in the process is redone (or removed) for the next one.
    """
    global _ours
    if os.environ.get(ENV) and os.environ[ENV] != _ours:
        return
    if _ours is not None:
        os.environ.pop(ENV, None)
        _ours = None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    parallel = vllm_config.parallel_config
    ranks = parallel.local_world_size
    if ranks <= 1 or parallel.data_parallel_size > 1:
        return
    import vllm.utils.cpu_resource_utils as cr_utils

    if len(cr_utils.get_visible_memory_node()) >= ranks:
        return  # vLLM's auto binding: one NUMA node per rank
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise TidarError(
            f"tensor_parallel_size x pipeline_parallel_size = {ranks} CPU ranks, but only {len(cpus)} CPU cores "
            f"are allowed (one core per rank at least); use fewer ranks or set {ENV} yourself"
        )
    per = len(cpus) // ranks
    value = "|".join(",".join(map(str, cpus[r * per : (r + 1) * per])) for r in range(ranks))
    os.environ[ENV] = _ours = value
    logger.warning("TiDAR: %d CPU ranks on fewer NUMA nodes: set %s=%r (one share of the allowed cores per rank)",
                   ranks, ENV, value)
