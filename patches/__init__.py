"""vLLM monkey-patches, installed as ``vllm_tidar.patches`` (see ``vllm_tidar/plugin/patching.py``).

Each module names the vLLM version it targets (``TARGET_VERSION``), checks the upstream
code it wraps (``check_upstream``) and installs itself idempotently (``apply``).
"""
