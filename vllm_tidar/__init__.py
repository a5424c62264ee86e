"""vllm-tidar: TiDAR (diffusion-drafted, AR-verified decoding) for vLLM."""


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``: ``tidar``).

    Lazy: importing ``vllm_tidar`` never imports vLLM.
    """
    from .plugin import register as _register

    _register()
