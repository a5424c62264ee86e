"""TiDAR checkpoints: Hugging Face causal LMs (Llama, Qwen2, Qwen3) whose ``config.json``
carries a ``tidar`` section, so a checkpoint describes itself.

A TiDAR checkpoint is a plain HF folder: transformers loads it as the base family
(``model_type`` is unchanged), while ``architectures`` names the TiDAR class that the
vLLM plugin registers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .draft_adapter import AdapterSpec, DraftAdapter, attach_hf, draft_adapter
from .errors import TidarError
from .layout import _check_block_len

MASK_TOKEN = "<|mask|>"
# the bundled demo checkpoint (committed; ``vllm-tidar build-demo`` rebuilds it)
DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo"

# model_type of the base family -> architecture name the vLLM plugin registers
ARCHITECTURES = {
    "llama": "TiDARLlamaForCausalLM",
    "qwen2": "TiDARQwen2ForCausalLM",
    "qwen3": "TiDARQwen3ForCausalLM",
}


@dataclass(frozen=True)
class TidarSettings:
    """What a TiDAR checkpoint stores under ``config.json["tidar"]``."""

    block_length: int
    mask_token_id: int
    beta: float = 1.0  # weight of the AR logits in the bonus position ("trust AR" = 1)
    block_lengths: tuple[int, ...] = ()  # every block length it was trained with (block_length among them)
    draft_adapter: AdapterSpec | None = None  # low-rank weights of the mask rows only (``draft_adapter``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_lengths", tuple(sorted({self.block_length, *self.block_lengths}, reverse=True)))
        try:
            for bl in self.block_lengths:
                _check_block_len(bl)
        except ValueError as e:
            raise TidarError(str(e)) from None
        if not 0.0 <= self.beta <= 1.0:
            raise TidarError(f"beta must be in [0, 1], got {self.beta}")

    @classmethod
    def from_hf_config(cls, config, source: str = "checkpoint") -> "TidarSettings":
        raw = getattr(config, "tidar", None)
        if not isinstance(raw, dict):
            raise TidarError(
                f"{source} has no TiDAR settings (config.json needs a 'tidar' section with "
                "block_length and mask_token_id); convert an AR checkpoint with `vllm-tidar train`"
            )
        if raw.get("mask_token_id") is None or raw.get("block_length") is None:
            raise TidarError(f"{source}: config.json 'tidar' section lacks block_length or mask_token_id")
        try:
            trained = tuple(int(b) for b in raw.get("block_lengths", ()))
        except (TypeError, ValueError):
            raise TidarError(f"{source}: config.json 'tidar' block_lengths must be a list of integers") from None
        adapter = raw.get("draft_adapter")
        if adapter is not None:
            adapter = AdapterSpec.from_dict(adapter, source)
        settings = cls(int(raw["block_length"]), int(raw["mask_token_id"]), float(raw.get("beta", 1.0)), trained,
                       adapter)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and not 0 <= settings.mask_token_id < vocab:
            raise TidarError(f"{source}: mask_token_id {settings.mask_token_id} outside vocabulary of {vocab}")
        return settings

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_lengths"] = list(self.block_lengths)
        if self.draft_adapter is None:
            del d["draft_adapter"]
        else:
            d["draft_adapter"] = self.draft_adapter.to_dict()
        return d

    def served_block_lengths(self) -> tuple[int, ...]:
        """Block lengths a server may draft with: the served ``block_length`` and the trained
        ones below it (a step of those fits in the tokens scheduled for ``block_length``)."""
        return tuple(b for b in self.block_lengths if b <= self.block_length)


def check_family(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TidarError(
            f"model type {model_type!r} is not supported; TiDAR supports {', '.join(sorted(ARCHITECTURES))}"
        )
    return model_type


def ensure_mask_token(model, tokenizer) -> int:
    """Return the id of the dedicated mask token, adding it (and an embedding row) if absent."""
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return mask_id


ATTENTION_IMPLEMENTATIONS = ("sdpa", "flex")


def load_tidar(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", attention: str = "sdpa"):
    """Load (model, tokenizer, settings) from a TiDAR checkpoint folder, with clear errors.

    ``attention``: ``"sdpa"`` (dense bool masks) or ``"flex"`` (FlexAttention with
    BlockMasks read from the same layout masks, see ``vllm_tidar.hf_flex``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise TidarError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    attn_implementation = "sdpa"
    if attention == "flex":
        from .hf_flex import register

        attn_implementation = register()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TidarError(f"{path} is not a checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_family(config)
    settings = TidarSettings.from_hf_config(config, source=str(path))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
    ).to(device)
    if settings.draft_adapter is not None:
        attach_hf(model, DraftAdapter.load(path, settings.draft_adapter).to(dtype), settings.mask_token_id)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, settings


def save_tidar(model, tokenizer, settings: TidarSettings, out: str | Path, state_dict: dict | None = None) -> Path:
    """Save a plain HF folder with the TiDAR section and architecture in config.json
    (``state_dict``: the weights to write instead of the model's own, e.g. gathered from FSDP shards),
    and the model's draft adapter, if it has one (``settings.draft_adapter``)."""
    out = Path(out)
    model_type = check_family(model.config)
    model.save_pretrained(out, state_dict=state_dict)
    adapter = draft_adapter(model)
    if (adapter is None) != (settings.draft_adapter is None):
        raise TidarError("save_tidar: the settings and the model disagree on a draft adapter")
    if adapter is not None:
        adapter.save(out)
    tokenizer.save_pretrained(out)
    # written after save_pretrained, which resets "architectures" to the HF class
    cfg_file = out / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["tidar"] = settings.to_dict()
    raw["architectures"] = [ARCHITECTURES[model_type]]
    cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out


def read_config(path: str | Path) -> dict:
    """``path/config.json`` as a dict, or a one-line error."""
    cfg_file = Path(path) / "config.json"
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TidarError(f"cannot read {cfg_file}: {e}") from None


def read_settings(path: str | Path) -> TidarSettings:
    """TiDAR settings from ``path/config.json`` without loading weights."""
    return TidarSettings.from_hf_config(SimpleNamespace(**read_config(path)), source=str(path))
