"""Draft adapters: only [MASK] rows run through them (AR rows are the base bit for bit), the
checkpoint round trip, the trainer's frozen-base mode and its errors, and parity in vLLM."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from vllm_tidar.checkpoint import TidarSettings, load_tidar, save_tidar
from vllm_tidar.cli import main
from vllm_tidar.draft_adapter import FOLDER, WEIGHTS, AdapterSpec, DraftAdapter, attach_hf, draft_adapter
from vllm_tidar.errors import TidarError
from vllm_tidar.layout import TrainingLayout
from vllm_tidar.objective import row_losses
from vllm_tidar.reference import ReferenceDecoder

from vllm_helpers import tiny_checkpoint


def _random_adapter(model, rank=4, scale=0.5, seed=1, targets=None):
    spec = AdapterSpec(rank, tuple(targets) if targets else AdapterSpec(rank).targets)
    adapter = DraftAdapter.fresh(model, spec, seed=seed).to(next(model.parameters()).dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapter.b:
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * scale)
    return adapter


def test_only_mask_rows_change_ar_rows_are_the_base_exactly():
    base, model = tiny_llama(), tiny_llama()
    mask = base.config.vocab_size - 1
    attach_hf(model, _random_adapter(model), mask)
    lay = TrainingLayout(16, 4)
    tokens = torch.randint(0, mask, (3, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=lay.input_ids(tokens, mask), position_ids=lay.position_ids.expand(3, -1),
              attention_mask=lay.template[None, None].expand(3, 1, -1, -1))
    with torch.no_grad():
        want, got = base(**kw).logits, model(**kw).logits
    clean_w, masks_w = lay.halves(want)
    clean_g, masks_g = lay.halves(got)
    assert torch.equal(clean_g, clean_w)  # bit for bit: the AR side is the base
    assert (masks_g - masks_w).abs().amax() > 1e-2  # the mask rows run through the adapter


@pytest.mark.parametrize("block_len", [4, 8])
def test_frozen_clean_half_gives_the_doubled_forwards_losses_and_gradients(block_len):
    model = tiny_llama()
    mask = model.config.vocab_size - 1
    adapter = _random_adapter(model)
    model.requires_grad_(False)
    attach_hf(model, adapter, mask)
    lay = TrainingLayout(16, block_len)
    tokens = torch.randint(0, mask, (3, 16), generator=torch.Generator().manual_seed(0))
    got = []
    for frozen_clean in (False, True):
        adapter.zero_grad(set_to_none=True)
        parts = row_losses(model, tokens, lay, mask, base=model, frozen_clean=frozen_clean)
        (parts.diff.sum() + parts.ar.sum()).backward()
        got.append((parts, [p.grad.clone() for p in adapter.parameters()]))
    (want, want_g), (split, split_g) = got
    for name in ("ar", "diff", "kl"):
        torch.testing.assert_close(getattr(split, name), getattr(want, name), rtol=1e-5, atol=1e-5)
    assert split.ar.grad_fn is None  # the clean half ran without autograd
    assert any(g.abs().amax() > 0 for g in want_g)
    for g_split, g_want in zip(split_g, want_g):
        torch.testing.assert_close(g_split, g_want, rtol=1e-4, atol=1e-6)


def test_decoding_with_an_adapter_is_lossless_and_the_ar_output_is_the_bases():
    base, model = tiny_llama(), tiny_llama()
    settings = TidarSettings(block_length=4, mask_token_id=base.config.vocab_size - 1)
    attach_hf(model, _random_adapter(model), settings.mask_token_id)
    with_adapter, plain = ReferenceDecoder(model, settings), ReferenceDecoder(base, settings)
    changed = 0
    for seed in range(4):
        prompt = torch.randint(0, 90, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar = plain.generate(prompt, 40, mode="ar").token_ids
        assert with_adapter.generate(prompt, 40, mode="ar").token_ids == ar
        res = with_adapter.generate(prompt, 40, mode="tidar")
        assert res.token_ids == ar
        changed += res.accepted_drafts != plain.generate(prompt, 40, mode="tidar").accepted_drafts
    assert changed  # the adapter drafts differently


def test_checkpoint_round_trip_keeps_the_base_file_plain(tmp_path):
    ckpt = tiny_checkpoint(block_length=4)
    model, tok, settings = load_tidar(ckpt)
    adapter = _random_adapter(model, rank=3, targets=("q_proj", "down_proj"))
    attach_hf(model, adapter, settings.mask_token_id)
    with_spec = TidarSettings(settings.block_length, settings.mask_token_id, block_lengths=settings.block_lengths,
                              draft_adapter=adapter.spec)
    out = save_tidar(model, tok, with_spec, tmp_path / "ck")
    assert json.loads((out / "config.json").read_text())["tidar"]["draft_adapter"] == {
        "rank": 3, "targets": ["q_proj", "down_proj"]}
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    assert set(load_file(str(out / FOLDER / WEIGHTS))) == {
        f"model.layers.{i}.{m}.lora_{ab}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"}
    loaded, _, s2 = load_tidar(out)
    assert s2.draft_adapter == adapter.spec and draft_adapter(loaded) is not None
    ids = torch.tensor([[5, 6, 7, settings.mask_token_id, settings.mask_token_id]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(TidarError, match="disagree on a draft adapter"):
        save_tidar(model, tok, settings, tmp_path / "bad")
    (out / FOLDER / WEIGHTS).unlink()
    with pytest.raises(TidarError, match=f"{FOLDER}/{WEIGHTS} is missing"):
        load_tidar(out)


def test_adapter_spec_errors():
    with pytest.raises(TidarError, match="rank must be a positive integer"):
        AdapterSpec(0)
    with pytest.raises(TidarError, match="targets must be among"):
        AdapterSpec(4, ("qkv",))
    with pytest.raises(TidarError, match="must be an object with a rank"):
        TidarSettings.from_hf_config(type("C", (), {"tidar": {"block_length": 4, "mask_token_id": 1,
                                                              "draft_adapter": 8}})())


def _train(data, out, *extra, base=None):
    return main(["train", "--base", str(base or tiny_checkpoint()), "--data", str(data), "--out", str(out),
                 "--block-lengths", "4", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--save-every", "2",
                 *extra])


def test_training_an_adapter_freezes_the_base_and_resumes(data, tmp_path):
    base = tiny_checkpoint()
    out = tmp_path / "ad"
    assert _train(data, out, "--steps", "2", "--draft-adapter-rank", "4") == 0
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    b2 = load_file(str(out / FOLDER / WEIGHTS))
    assert all(v.abs().sum() > 0 for k, v in b2.items() if k.endswith("lora_B"))  # trained away from 0
    assert _train(data, out, "--steps", "3", "--draft-adapter-rank", "4", "--resume") == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3]
    b3 = load_file(str(out / FOLDER / WEIGHTS))
    assert any(not torch.equal(b2[k], b3[k]) for k in b2)
    # the checkpoint names its adapter, which a further run with the same rank and targets continues
    _, _, settings = load_tidar(out)
    assert settings.draft_adapter == AdapterSpec(4)


def test_adapter_training_errors(data, tmp_path, capsys):
    cases = [
        (("--steps", "1", "--draft-adapter-rank", "-2"), "rank must be a positive integer"),
        (("--steps", "1", "--draft-adapter-rank", "4", "--draft-adapter-targets", "w1"), "targets must be among"),
        (("--steps", "1", "--draft-adapter-rank", "4", "--kl-weight", "1"), "nothing to anchor"),
    ]
    for extra, msg in cases:
        assert main(["train", "--base", str(tiny_checkpoint()), "--data", str(data), "--out", str(tmp_path / "e"),
                     *extra]) != 0
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    out = tmp_path / "r4"
    assert _train(data, out, "--steps", "1", "--draft-adapter-rank", "4") == 0
    assert _train(data, tmp_path / "r8", "--steps", "1", "--draft-adapter-rank", "8", base=out) != 0
    assert "asks for another" in capsys.readouterr().err


@pytest.mark.parametrize("merged_dtype", [torch.float32, torch.bfloat16])
def test_mask_rows_run_on_merged_weights_and_other_rows_on_the_base(merged_dtype):
    """``VLLMDraftAdapter`` on a CPU layer packed by vLLM's GEMM dispatch: in the steady state
    the verify rows of each block are the base GEMM's bit for bit, the mask rows equal base
    plus the low-rank pair; in a mixed batch (routed rows given with repeats of weight 0) the
    same holds row by row; with no rows the layer is the base. bf16 merged weights (drafts
    only): the same, mask rows to bf16 precision, every row back in fp32."""
    from torch import nn
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from vllm_tidar.draft_adapter import VLLMDraftAdapter

    class Proj(nn.Module):  # what a vLLM linear layer does on the CPU
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            return self.cpu_linear(x, self.weight, None)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    root = nn.Module()
    root.blk = nn.Module()
    root.blk.o_proj = Proj(w.clone())
    adapter = DraftAdapter(AdapterSpec(4, ("o_proj",)), {"blk.o_proj": (16, 24)})
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    a, b = adapter.a[0].detach(), adapter.b[0].detach()
    vad = VLLMDraftAdapter(root, adapter, "cpu", torch.float32, merged_dtype)
    vad.merge_base()  # in the model's load_weights, before vLLM packs the base
    tol = dict(rtol=1e-4, atol=1e-4) if merged_dtype == torch.float32 else dict(rtol=2e-2, atol=0.3)  # |out| ~ 30
    dispatch_cpu_unquantized_gemm(root.blk.o_proj, remove_weight=True)
    base = root.blk.o_proj.cpu_linear
    for n in (1, 3):
        x = torch.randn(n * 10, 16, generator=g)
        vad.set_blocks(n, 10, 4)
        assert vad.split
        assert not root.blk.o_proj._forward_hooks  # the merged GEMM replaced the low-rank hook
        out = root.blk.o_proj(x).view(n, 10, -1)
        assert out.dtype == torch.float32
        xv = x.view(n, 10, -1)
        assert torch.equal(out[:, :4], base(xv[:, :4].reshape(-1, 16), None, None).view(n, 4, -1))
        exact = (xv[:, 4:] @ w.t()) + (xv[:, 4:] @ a) @ b
        torch.testing.assert_close(out[:, 4:], exact, **tol)
        assert torch.allclose(out[:, 4:], exact, rtol=1e-5, atol=1e-5) == (merged_dtype == torch.float32)
    x = torch.randn(12, 16, generator=g)  # a prefill of 5 rows, then one step's 7 rows (5 routed)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 11, 11, 11, 11, 11])
    weight = torch.tensor([0.0] * 7 + [1.0] * 5 + [0.0] * 6)[:, None]  # 11 again with weight 0
    vad.set_rows(rows, weight)
    out, routed = root.blk.o_proj(x), torch.arange(12) >= 7
    assert torch.equal(out[~routed], base(x[~routed], None, None))
    torch.testing.assert_close(out[routed], x[routed] @ w.t() + (x[routed] @ a) @ b, **tol)
    vad.set_rows(rows, torch.zeros_like(weight))
    assert torch.equal(root.blk.o_proj(x), base(x, None, None))
    vad.set_rows(None)
    assert root.blk.o_proj.cpu_linear is base  # a step without mask rows calls vLLM's GEMM itself
    assert torch.equal(root.blk.o_proj(x), base(x, None, None))
    vad.set_blocks(1, 10, 4)
    assert root.blk.o_proj.cpu_linear is not base


@pytest.mark.parametrize("merged_dtype", [torch.float32, torch.bfloat16])
def test_draft_tokens_come_from_a_head_in_the_draft_dtype_rescored(merged_dtype):
    """``pack_draft_head``: with merged weights in bf16 (an fp32 model) the proposer's draft
    tokens come from a bf16 copy of the lm_head (padded vocab rows dropped, MASK never picked),
    its top candidates rescored on the fp32 rows: the fp32 head's argmax on every row, near ties
    included, where bf16 logits alone pick another token. With fp32 merged weights there is no
    such head (the model's own ``compute_logits`` drafts)."""
    from torch import nn

    from vllm_tidar.draft_adapter import VLLMDraftAdapter

    g = torch.Generator().manual_seed(1)
    root = nn.Module()
    root.blk = nn.Module()
    root.blk.o_proj = nn.Linear(16, 16, bias=False)
    adapter = DraftAdapter(AdapterSpec(2, ("o_proj",)), {"blk.o_proj": (16, 16)})
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    vad = VLLMDraftAdapter(root, adapter, "cpu", torch.float32, merged_dtype)
    vad.merge_base()
    vad.pack_draft_head(None, 37)  # no plain lm_head on this rank (another pipeline stage's)
    assert vad.draft_ids(torch.randn(2, 16, generator=g), exclude=2) is None
    head = torch.randn(40, 16, generator=g)  # 37 real vocab rows, 3 of padding
    head[5] = head[6] * (1 + 1e-4)  # near ties: bf16 cannot tell rows 5 and 6 apart
    head[39] = 100 * head[6]  # a padding row that would win
    vad.pack_draft_head(head, 37)
    h = torch.cat([head[6:7].repeat(8, 1) + 0.01 * torch.randn(8, 16, generator=g), torch.randn(200, 16, generator=g)])
    ids = vad.draft_ids(h, exclude=2)
    if merged_dtype == torch.float32:
        assert ids is None
        return
    exact = h @ head[:37].t()
    exact[:, 2] = -torch.inf
    assert torch.equal(ids, exact.argmax(-1))
    lossy = (h.bfloat16() @ head[:37].bfloat16().t()).float()
    lossy[:, 2] = -torch.inf
    assert not torch.equal(lossy.argmax(-1), exact.argmax(-1))  # what rescoring fixes



@pytest.mark.slow
def test_vllm_runs_the_adapter_on_mask_rows_only(tmp_path):
    """In vLLM: greedy output equals AR's, and tokens, accepted drafts per step and drafts equal
    the reference decoder's with the adapter (fused QKV / gate-up included) with fp32 merged
    weights; compile is turned off. With bf16 merged weights (``tidar_draft_dtype``: the drafts
    change, the verify rows do not) the output is still AR's and drafts are still accepted."""
    from vllm import SamplingParams

    from vllm_helpers import (MAX_MODEL_LEN, close_llm, generate, make_llm, prompt_set, proposed_drafts,
                              reference_drafts, runner_model, token_ids)

    model, tok, settings = load_tidar(tiny_checkpoint(block_length=4))
    adapter = _random_adapter(model, rank=4, scale=0.3)
    attach_hf(model, adapter, settings.mask_token_id)
    spec = TidarSettings(settings.block_length, settings.mask_token_id, block_lengths=settings.block_lengths,
                         draft_adapter=adapter.spec)
    ckpt = save_tidar(model, tok, spec, tmp_path / "ck")
    prompts = prompt_set(ckpt, 6, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = make_llm(ckpt, hf_overrides={"tidar_mode": "ar"})
    try:
        ar = token_ids(generate(llm, prompts, greedy))
    finally:
        close_llm(llm)
    llm = make_llm(ckpt, hf_overrides={"tidar_draft_dtype": "bfloat16"}, per_request_spec_decode_metrics="detailed")
    try:
        out16 = generate(llm, prompts, greedy)
        merged = runner_model(llm)._tidar_adapter.merged_layers()
        assert merged and all(h.weight.dtype == torch.bfloat16 for h in merged.values())
        assert runner_model(llm)._tidar_adapter._head is not None  # the draft logits' bf16 lm_head
    finally:
        close_llm(llm)
    assert token_ids(out16) == ar
    assert sum(sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in out16) > 0
    llm = make_llm(ckpt, enforce_eager=False, per_request_spec_decode_metrics="detailed",
                   hf_overrides={"tidar_draft_dtype": "float32"})  # drafts exactly the reference decoder's
    try:
        assert llm.llm_engine.vllm_config.model_config.enforce_eager
        from vllm_tidar.draft_adapter import VLLMDraftAdapter

        paths: list[str] = []  # the hook path each adapted forward took
        set_rows, set_blocks = VLLMDraftAdapter.set_rows, VLLMDraftAdapter.set_blocks

        def rows_spy(self, rows, weight=None):
            out = set_rows(self, rows, weight)
            if rows is not None:
                paths.append("merged rows" if self.split else "rows")
            return out

        def blocks_spy(self, *blocks):
            out = set_blocks(self, *blocks)
            paths.append("merged" if self.split else "blocks")
            return out

        VLLMDraftAdapter.set_rows, VLLMDraftAdapter.set_blocks = rows_spy, blocks_spy
        try:
            out = generate(llm, prompts, greedy)
            # staggered arrivals: later prompts prefill in batches where earlier ones run TiDAR steps
            engine, staggered = llm.llm_engine, {}
            for i, prompt in enumerate(prompts):
                engine.add_request(f"s{i}", {"prompt_token_ids": prompt}, greedy)
                for _ in range(3):
                    for o in engine.step():
                        if o.finished:
                            staggered[o.request_id] = list(o.outputs[0].token_ids)
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        staggered[o.request_id] = list(o.outputs[0].token_ids)
        finally:
            VLLMDraftAdapter.set_rows, VLLMDraftAdapter.set_blocks = set_rows, set_blocks
        assert [staggered[f"s{i}"] for i in range(len(prompts))] == ar
        # steady all-TiDAR batches and mixed ones, both with mask rows on merged weights (CPU)
        assert set(paths) == {"merged rows", "merged"}
        assert token_ids(out) == ar
        proposed = proposed_drafts(llm, prompts[:1], greedy)
    finally:
        close_llm(llm)
    dec = ReferenceDecoder(model, settings, max_len=MAX_MODEL_LEN)
    plain_model, _, _ = load_tidar(tiny_checkpoint(block_length=4))
    plain = ReferenceDecoder(plain_model, settings, max_len=MAX_MODEL_LEN)
    differs = 0
    for p, o in zip(prompts, out):
        ref = dec.generate(p, 32, mode="tidar")
        assert list(o.outputs[0].token_ids) == ref.token_ids
        assert o.outputs[0].spec_decode_metrics.per_step_accepted == ref.accepted_drafts
        differs += ref.accepted_drafts != plain.generate(p, 32, mode="tidar").accepted_drafts
    assert differs  # the adapter is what drafts
    # the drafts at batch 1, step by step (first: the prefill's mask block's)
    session_drafts = reference_drafts(dec, prompts[0], 32)
    assert proposed[: len(session_drafts)] == session_drafts


def test_vllm_config_hook_turns_eager_on_and_refuses_tensor_parallel(monkeypatch):
    from types import SimpleNamespace as NS

    from vllm_tidar.layout import DecodeLayout
    from vllm_tidar.plugin import config as hook_module
    from vllm_tidar.plugin.common import PROPOSER_PATH

    monkeypatch.setattr(hook_module, "default_thread_binding", lambda _cfg: None)

    def vllm_config(tp: int, adapter: bool = True):
        tidar = {"block_length": 4, "mask_token_id": 1, **({"draft_adapter": {"rank": 4}} if adapter else {})}
        spec = NS(method="custom_class", model=PROPOSER_PATH,
                  num_speculative_tokens=DecodeLayout(4, 3).num_speculative_tokens)
        return NS(parallel_config=NS(pipeline_parallel_size=1, tensor_parallel_size=tp), speculative_config=spec,
                  model_config=NS(hf_config=NS(tidar=tidar, vocab_size=8192), model="ckpt", enforce_eager=False),
                  scheduler_config=NS(max_num_batched_tokens=4096, max_num_seqs=4))

    cfg = vllm_config(1)
    hook_module.TiDARConfigHook.verify_and_update_config(cfg)
    assert cfg.model_config.enforce_eager
    plain = vllm_config(1, adapter=False)
    hook_module.TiDARConfigHook.verify_and_update_config(plain)
    assert not plain.model_config.enforce_eager
    with pytest.raises(TidarError, match="tensor_parallel_size=1 only"):
        hook_module.TiDARConfigHook.verify_and_update_config(vllm_config(2))


def test_bundled_demo_carries_the_adapter_its_recipe_trains():
    """The bundled checkpoint's adapter has the rank ``build-demo`` trains, its tensors agree,
    and the held-out evaluation source that ``build-demo`` keeps out of distillation exists."""
    from pathlib import Path

    from vllm_tidar.checkpoint import DEMO_CHECKPOINT, read_settings
    from vllm_tidar.demo_base import DEMO_DISTILL_RECIPE, held_out_source

    spec = read_settings(DEMO_CHECKPOINT).draft_adapter
    assert spec.rank == DEMO_DISTILL_RECIPE["draft_adapter_rank"]
    adapter = DraftAdapter.load(DEMO_CHECKPOINT, spec)  # raises on a rank mismatch
    assert len(adapter.names) == 6 * len(spec.targets)
    assert any(Path(held_out_source()).rglob("*.py"))
