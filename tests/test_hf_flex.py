"""FlexAttention path of the reference decoder: same masks as SDPA, same outputs.

Runs on CPU (eager flex) and, where a GPU is present, on CUDA (compiled flex).
"""

import pytest
import torch

from vllm_tidar import hf_flex
from vllm_tidar.checkpoint import TidarSettings
from vllm_tidar.layout import DecodeLayout, StepMask
from vllm_tidar.reference import ReferenceDecoder

from conftest import tiny_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_block_mask_reproduces_the_step_template(device):
    layout = DecodeLayout(4)
    dense = StepMask(layout, 300, device).for_prefix(137)
    bm = hf_flex.block_mask(dense)
    assert bm.shape[-2:] == dense.shape
    assert torch.equal(_mask_of(bm, dense.shape), dense)


def _mask_of(bm, shape):
    q = torch.arange(shape[0], device=bm.kv_indices.device)[:, None]
    kv = torch.arange(shape[1], device=bm.kv_indices.device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    return bm.mask_mod(zero, zero, q, kv)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_decoder_matches_sdpa_decoder(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    sdpa = tiny_llama(dtype=dtype).to(device)
    flex = tiny_llama(dtype=dtype, attn_implementation=hf_flex.register()).to(device)
    flex.load_state_dict(sdpa.state_dict())
    assert flex.config._attn_implementation == "tidar_flex"
    settings = TidarSettings(block_length=4, mask_token_id=sdpa.config.vocab_size - 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        prompt = torch.randint(0, settings.mask_token_id, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        outs = {}
        for name, model in (("sdpa", sdpa), ("flex", flex)):
            dec = ReferenceDecoder(model, settings)
            for mode in ("ar", "tidar"):
                outs[name, mode] = dec.generate(prompt, 12, mode=mode).token_ids
        assert outs["flex", "tidar"] == outs["sdpa", "tidar"] == outs["sdpa", "ar"] == outs["flex", "ar"], prompt


def test_flex_attention_needs_a_block_mask():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(TypeError, match="BlockMask"):
        hf_flex.tidar_flex_attention(None, q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool))
