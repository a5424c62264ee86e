"""One-line TidarError for settings the vLLM plugin cannot serve (no engine starts)."""

from __future__ import annotations

import pytest

from vllm_helpers import CACHE, close_llm, make_llm, tiny_checkpoint

from vllm_tidar.errors import TidarError


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(block_length=4)


def _expect_error(match, model, **kwargs):
    with pytest.raises(TidarError, match=match) as info:
        llm = make_llm(model, **kwargs)
        close_llm(llm)
    assert "\n" not in str(info.value)


def test_method_tidar_on_non_tidar_checkpoint(ckpt):
    base = CACHE / "base"  # the plain AR base the tiny checkpoint was made from
    _expect_error("needs a TiDAR checkpoint", base, speculative_config={"method": "tidar"})


def test_too_many_drafts_for_the_checkpoint(ckpt):
    _expect_error("between 1 and 3", ckpt, speculative_config={"method": "tidar", "num_speculative_tokens": 4})


def test_token_budget_smaller_than_one_step(ckpt):
    _expect_error(
        "smaller than one TiDAR step of 20 tokens",
        ckpt,
        max_num_batched_tokens=16,
        max_num_seqs=1,
        max_model_len=16,
    )


def test_raw_custom_class_with_bad_token_count(ckpt):
    from vllm_tidar.plugin import PROPOSER_PATH

    _expect_error(
        "is not K",
        ckpt,
        speculative_config={"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": 7},
    )


def test_cli_speculative_config_sugar(ckpt):
    """``vllm serve CKPT --speculative-config '{"method": "tidar", ...}'`` parses and rewrites."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_tidar

    vllm_tidar.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        [
            "--model", str(ckpt),
            "--speculative-config", '{"method": "tidar", "num_speculative_tokens": 2}',
            "--enforce-eager", "--max-model-len", "512",
        ]
    )
    cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert cfg.speculative_config.method == "custom_class"
    assert cfg.speculative_config.num_speculative_tokens == 2 + 3 * 4
