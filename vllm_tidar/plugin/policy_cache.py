"""Per-machine cache of the adaptive drafting policy's measurements, so an engine restarted on
the same machine with the same checkpoint starts from the step costs and acceptance the last
one measured instead of drafting blind until it has measured them again.

One JSON file per (machine, checkpoint, engine settings), named by a hash of that identity
(which the file also holds, for people): the CPU model (or GPU name), core and thread
counts, the checkpoint's path and its files' sizes and modification times (a retrained
adapter is a new checkpoint), dtype, tensor parallelism, the served block length and
``num_speculative_tokens``, and the vLLM and plugin versions. The proposer restores it at
start and writes it back (atomically) every ``save_every`` seconds of serving that added
measurements, and at exit. The policy keeps measuring online, so a cache written under
another load is corrected within a few dozen steps.

``VLLM_TIDAR_POLICY_CACHE``: unset, the folder ``$VLLM_CACHE_ROOT/tidar_policy`` (vLLM's
cache root, ``~/.cache/vllm`` by default); a path, that folder; ``0``/``off``, no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path

from .common import engine_runner, plugin_logger

logger = plugin_logger(__name__)

VERSION = 1  # of the file's layout
_OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The cache folder ``VLLM_TIDAR_POLICY_CACHE`` names, or None when it turns the cache off."""
    value = os.environ.get("VLLM_TIDAR_POLICY_CACHE", "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    import vllm.envs as envs

    return Path(envs.VLLM_CACHE_ROOT).expanduser() / "tidar_policy"


def machine_identity() -> dict:
    """What makes step costs differ between machines: processor, cores, torch threads, GPU, and
    the OpenMP runtime and allocator (``cpu_runtime``: Intel OpenMP makes TiDAR steps cheaper)."""
    import torch

    from ..cpu_runtime import cpu_model, describe_runtime

    cpu = cpu_model() or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "runtime": describe_runtime()}


def checkpoint_identity(model: str) -> dict:
    """The checkpoint's path and (for a local folder) its config, weights and adapter files'
    sizes and modification times."""
    path = Path(model)
    if not path.is_dir():
        return {"model": model}
    files = []
    for sub in (path, path / "draft_adapter"):
        if sub.is_dir():
            for f in sorted(sub.iterdir()):
                if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".pt"):
                    st = f.stat()
                    files.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return {"model": str(path.resolve()), "files": files}


class PolicyCache:
    """The cache file of one engine: ``restore`` into a ``DraftPolicy``, ``maybe_save`` from
    the serving loop, ``save`` at exit."""

    def __init__(self, folder: Path, identity: dict, save_every: float = 30.0):
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(identity.get("checkpoint", {}).get("model", "model"))).name)
        self.path = Path(folder) / f"{name or 'model'}-{digest}.json"
        self.save_every = save_every
        self._saved_at = time.monotonic()
        self._saved_steps = 0
        self._broken = False  # a write failed: warned once, no more tries
        self.restored_steps = 0  # steps measured by the engine whose state was restored

    @classmethod
    def for_engine(cls, vllm_config, block_length: int) -> PolicyCache | None:
        """The cache of the engine ``vllm_config`` describes, or None when it is turned off."""
        folder = cache_dir()
        if folder is None:
            return None
        from importlib.metadata import PackageNotFoundError, version

        import vllm

        try:
            plugin = version("vllm-tidar")
        except PackageNotFoundError:
            plugin = None
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        identity = {
            "machine": machine_identity(),
            "checkpoint": checkpoint_identity(mc.model),
            "engine": {"dtype": str(mc.dtype), "tensor_parallel_size": pc.tensor_parallel_size,
                       "block_length": block_length,
                       "num_speculative_tokens": vllm_config.speculative_config.num_speculative_tokens,
                       "vllm": vllm.__version__, "vllm_tidar": plugin},
        }
        return cls(folder, identity)

    def restore(self, policy) -> bool:
        """Load the file into ``policy``; False (and the policy untouched) when there is none or
        it is unreadable (then a warning says so and the next save replaces it)."""
        if not self.path.is_file():
            logger.info("TiDAR adaptive drafting: no policy measured on this machine yet (%s); measuring from scratch",
                        self.path)
            return False
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != VERSION or data.get("identity") != json.loads(json.dumps(self.identity)):
                raise ValueError("written for another version or identity")
            policy.load_state(data["policy"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("TiDAR adaptive drafting: ignoring the cached policy %s (%s); measuring from scratch",
                           self.path, e)
            return False
        self._saved_steps = self.restored_steps = policy.costs.num_observed
        logger.info("TiDAR adaptive drafting: starting from the policy measured earlier on this machine "
                    "(%d steps; %s)", self._saved_steps, self.path)
        return True

    def maybe_save(self, policy, now: float | None = None) -> None:
        """Save when ``save_every`` seconds passed since the last save and steps were measured."""
        now = time.monotonic() if now is None else now
        if now - self._saved_at >= self.save_every and policy.costs.num_observed != self._saved_steps:
            self.save(policy)
            self._saved_at = now

    def save(self, policy) -> None:
        """Write the policy's state (atomically: a reader never sees half a file)."""
        if self._broken or policy.costs.num_observed == self._saved_steps:
            return
        data = {"version": VERSION, "identity": self.identity, "policy": policy.state()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as e:
            self._broken = True
            logger.warning("TiDAR adaptive drafting: cannot write the policy cache %s (%s); "
                           "set VLLM_TIDAR_POLICY_CACHE to a writable folder or 0", self.path, e)
            return
        self._saved_steps = policy.costs.num_observed


def engine_policy_start(llm) -> dict | None:
    """How the adaptive policy of an in-process ``LLM`` started: the cache file it used (None:
    the cache is off) and the steps it restored from it (0: a cold start); None when the
    engine has no adaptive TiDAR proposer (AR, a fixed schedule, another method)."""
    drafter = getattr(engine_runner(llm), "drafter", None)
    policy = getattr(drafter, "policy", None)
    if policy is None or policy.schedule is not None:
        return None
    cache = drafter.cache
    return {"cache": str(cache.path) if cache is not None else None, "restored_steps": cache.restored_steps if cache else 0}


def describe_start(start: dict) -> str:
    """``engine_policy_start`` in words: "cold (...)" or "from this machine's policy cache (...)"."""
    if start["cache"] is None:
        return "cold (`VLLM_TIDAR_POLICY_CACHE=0`)"
    if start["restored_steps"]:
        return f"from this machine's policy cache ({start['restored_steps']} measured steps, `{start['cache']}`)"
    return f"cold (no policy cache yet at `{start['cache']}`)"
