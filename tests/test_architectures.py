"""Every supported architecture is exact: kiln's greedy tokens equal transformers' `generate`.

Each case is a tiny random-weight model built from the architecture's own config class, served
in float32 through kiln's Scheduler and ModelRunner in-process: several concurrent requests with
mixed prompt lengths, more requests than slots and a small prefill chunk, so prompt chunks and
decode tokens share steps and a freed slot is reused. Sliding windows are small enough that every
sequence outgrows them. A larger initializer range and Gemma's untied lm_head keep the random models
from repeating one token, which would hide errors.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

from engine_core.scheduler import Scheduler
from ipc.messages import Request, SamplingParams
from model.shape import SUPPORTED_ARCHITECTURES
from tests.conftest import REPO_ROOT

NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 23, 41, 12, 30)
MAX_BATCH, PREFILL_CHUNK, MAX_CONTEXT = 3, 16, 96
WINDOW = 8
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
    initializer_range=0.1,
)

# model_type -> what the case sets beyond TINY (each exercises what sets that architecture apart)
CASES = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # biased q/k/v
    "qwen3": dict(head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # q/k norms
    "starcoder2": dict(sliding_window=WINDOW, hidden_act="gelu_pytorch_tanh"),  # plain MLP, LayerNorm, biases
    "phi3": dict(
        sliding_window=WINDOW,
        original_max_position_embeddings=MAX_CONTEXT,  # fused qkv, gate_up
        rope_parameters=dict(
            rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.2, 1.5, 2, 3, 4, 6, 8], long_factor=[8.0] * 8
        ),
    ),  # within the planner's longrope cap (below)
    "gemma2": dict(
        head_dim=32,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        tie_word_embeddings=False,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),  # caps small enough to bite
    "gemma3_text": dict(
        head_dim=32,
        sliding_window=WINDOW,
        sliding_window_pattern=2,
        query_pre_attn_scalar=24,
        tie_word_embeddings=False,
    ),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.5),
    "smollm3": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW),  # NoPE layers
    "olmo2": {},  # q/k norms over all heads, norms after attention and MLP
    "cohere": dict(use_qk_norm=True, logit_scale=0.5),  # parallel attention and MLP, LayerNorm, q/k norms
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP threads spinning beside other processes on a
    small machine made a case 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY, **CASES[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(2, TINY["vocab_size"], (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def kiln_greedy(model, prompt_ids: list[list[int]], scheduler: Scheduler | None = None, runner=None):
    """Serve every prompt at once through the scheduler and runner, as the engine loop does."""
    from engine_core.model_runner import ModelRunner

    if runner is None:
        runner = ModelRunner(model, MAX_BATCH, MAX_CONTEXT, torch.device("cpu"), torch.float32)
    if scheduler is None:  # (an empty scheduler is falsy: it has a length)
        scheduler = Scheduler(MAX_BATCH, PREFILL_CHUNK, MAX_CONTEXT, eos_token_ids=set())
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    sequences = [scheduler.add(Request(f"r{i}", ids, params)) for i, ids in enumerate(prompt_ids)]
    mixed_steps = 0
    while len(scheduler):
        chunks = scheduler.schedule()
        mixed_steps += len({c.length == 1 for c in chunks}) == 2
        scheduler.update(chunks, runner.forward(chunks).sample.argmax(-1).tolist())
        scheduler.pool.check()
    assert mixed_steps > 0, "no step mixed prompt chunks with decode tokens"
    return [seq.output_ids for seq in sequences]


def transformers_greedy(model, prompt_ids: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            generated = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0, pad_token_id=0
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def test_every_supported_architecture_has_a_case():
    assert set(SUPPORTED_ARCHITECTURES) == set(CASES)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_greedy_tokens_equal_transformers_generate(model_type):
    model = tiny_model(model_type)
    reference = copy.deepcopy(model)  # the runner switches its model to kiln attention
    prompt_ids = prompts()
    expected = transformers_greedy(reference, prompt_ids)
    assert kiln_greedy(model, prompt_ids) == expected


def sharing_prompts(base: list[list[int]]) -> list[list[int]]:
    """Prompts that share prefixes with `base` and with each other: the same prompt again, one cut inside
    a block and continued differently, one extended past the end, and one reaching back into its sibling."""
    generator = torch.Generator().manual_seed(11)
    tail = torch.randint(2, TINY["vocab_size"], (12,), generator=generator).tolist()
    longest = max(base, key=len)
    return [longest, longest[:27] + tail[:9], longest + tail[:5], base[1] + tail, base[1][:10] + tail[:3]]


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_prefix_cache_hits_and_preemption_keep_greedy_tokens_exact(model_type):
    """Greedy tokens with cache hits equal transformers' without, token for token: a second wave reuses
    the first wave's blocks (whole prompts, prefixes cut inside a block), and a pool of one context's
    worth of 4-token blocks forces running sequences to be preempted and recompute."""
    from engine_core.block_pool import BlockPool
    from engine_core.model_runner import ModelRunner

    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    first_wave, second_wave = prompts(), sharing_prompts(prompts())
    expected = transformers_greedy(reference, first_wave + second_wave)
    blocks, block_size = MAX_CONTEXT // 4, 4
    runner = ModelRunner(model, MAX_BATCH, MAX_CONTEXT, torch.device("cpu"), torch.float32, blocks, block_size)
    scheduler = Scheduler(MAX_BATCH, PREFILL_CHUNK, MAX_CONTEXT, set(), BlockPool(blocks, block_size))
    served = kiln_greedy(model, first_wave, scheduler, runner) + kiln_greedy(model, second_wave, scheduler, runner)
    assert served == expected
    counters = scheduler.counters
    assert counters.preemptions > 0, "the small pool never preempted"
    assert counters.hits >= len(second_wave) * block_size, counters
    assert scheduler.pool.num_used == 0 and scheduler.pool.num_cached > 0


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_a_prefix_shared_by_the_batch_read_once_keeps_greedy_tokens_exact(model_type):
    """Rows decoding after one shared prefix (a system prompt) attend to it once for the whole batch
    (cascade attention, merged by log-sum-exp): greedy tokens equal transformers'. Models with sliding
    windows or logit softcaps never take that path."""
    from engine_core.block_pool import BlockPool
    from engine_core.model_runner import ModelRunner

    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    shared = torch.randint(2, TINY["vocab_size"], (41,), generator=generator).tolist()
    tails = [torch.randint(2, TINY["vocab_size"], (n,), generator=generator).tolist() for n in (3, 9, 6)]
    wave = [shared + tail for tail in tails]
    expected = transformers_greedy(reference, wave)
    blocks, block_size = 3 * MAX_CONTEXT // 4, 4
    runner = ModelRunner(model, MAX_BATCH, MAX_CONTEXT, torch.device("cpu"), torch.float32, blocks, block_size)
    runner.shared_prefix_min_saved = 0  # any shared prefix of two blocks or more (the threshold is about speed)
    scheduler = Scheduler(MAX_BATCH, PREFILL_CHUNK, MAX_CONTEXT, set(), BlockPool(blocks, block_size))
    assert kiln_greedy(model, wave, scheduler, runner) == expected
    if runner.shares_prefixes:
        assert runner.shared_prefix_steps >= NEW_TOKENS - 1
    else:
        assert runner.shared_prefix_steps == 0 and (model.config.sliding_window or model.config.attn_logit_softcapping)


def test_longrope_context_is_capped_where_its_factors_switch():
    """Past original_max_position_embeddings longrope would switch a whole step to its long factors,
    short sequences included, so the plan never lets a sequence get there."""
    from hardware.profile import simulated_profile
    from model.shape import shape_from_config
    from planning.planner import make_plan

    config = {
        "model_type": "phi3",
        "hidden_size": 3072,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 8192,
        "vocab_size": 32064,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
    }
    shape = shape_from_config(config)
    assert shape.max_position_embeddings == 4096 and "longrope" in shape.notes[0]
    assert make_plan(shape, simulated_profile(["A100:80GiB:8.0"], None, False)).max_context == 4096
    unscaled = shape_from_config({k: v for k, v in config.items() if k != "rope_scaling"})
    assert unscaled.max_position_embeddings == 131072


# ---------------------------------------------------------------- everything else is refused


def unsupported_folder(tmp_path, model_type: str, tokenizer_from: str | None = None):
    config = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 320,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer_from:  # serve reads the tokenizer before any engine starts
        shutil.copy(f"{tokenizer_from}/tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("model_type", ["mamba", "t5", "gemma3"])  # gemma3: the multimodal wrapper
def test_plan_refuses_an_unsupported_architecture_in_one_line(tmp_path, model_type):
    result = cli("plan", "--model", str(unsupported_folder(tmp_path, model_type)), "--cpu-only")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: architecture {model_type!r} is not supported")
    assert result.stderr.count("\n") == 1


def test_serve_refuses_an_unsupported_architecture_before_loading(tmp_path, default_model_path):
    result = cli(
        "serve",
        "--model",
        str(unsupported_folder(tmp_path, "mamba", default_model_path)),
        "--engines",
        "1",
        "--port",
        "0",
    )
    assert result.returncode != 0
    assert "architecture 'mamba' is not supported" in result.stderr.splitlines()[-1]


def test_runner_refuses_an_unsupported_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine_core.model_runner import ModelRunner, UnsupportedModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2' is not supported"):
        ModelRunner(model, 1, 16, torch.device("cpu"), torch.float32)
