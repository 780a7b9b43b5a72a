"""Offload on a CPU-only machine: GPU_LAYERS=N keeps N decoder layers in RAM, the rest go to disk.

The planner part is pure arithmetic on simulated machines. The engine part runs the real path:
`cli.py serve` with GPU_LAYERS set → the planner's device_map with "disk" entries → accelerate's
disk offload (weights memory-mapped, read in per forward by AlignDevicesHooks) → our batched model
runner, and checks greedy output token for token against transformers' own generate.
"""

from __future__ import annotations

import aiohttp
import msgspec
import pytest

from hardware.profile import GiB, simulated_profile
from model.shape import load_model_shape
from planning.dtypes import torch_dtype
from planning.overrides import overrides_from_env, overrides_from_flags, resolve_overrides
from planning.planner import PlanError, make_plan
from tests.conftest import REPO_ROOT, running_server
from tests.http_client import generate, post_json, run

CONFIGS = REPO_ROOT / "tests" / "fixtures" / "configs"
KEPT = 18  # of SmolLM2-135M's 30 decoder layers stay in RAM, 12 go to disk
PROMPT = {"prompt": "def fibonacci(n):", "max_new_tokens": 48, "temperature": 0}


# ---------------------------------------------------------------- planner, simulated machines


def _disk_layers(plan) -> list[str]:
    return [name for name, where in (plan.device_map or {}).items() if where == "disk"]


def test_small_ram_cpu_box_refuses_without_offload_and_plans_disk_offload_with_it():
    s = load_model_shape(CONFIGS / "llama-3.1-8b")
    box = simulated_profile(ram="8GiB", cpu_only=True)
    with pytest.raises(PlanError, match="GPU_LAYERS"):  # the refusal names the way out
        make_plan(s, box, overrides_from_flags(dtype="bfloat16", quantization="none"))
    plan = make_plan(s, box, overrides_from_flags(dtype="bfloat16", gpu_layers=4))
    assert plan.device == "cpu" and plan.offload and plan.quantization is None
    disk = _disk_layers(plan)
    assert disk == [f"model.layers.{i}" for i in range(4, s.num_layers)]
    assert all(plan.device_map[f"model.layers.{i}"] == "cpu" for i in range(4))
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        assert plan.device_map[name] == "cpu"
    layer = s.layer_params * 2
    assert plan.offload_bytes == (s.num_layers - 4) * layer
    # What stays in RAM (weights + one streamed layer + KV + reserve) fits the simulated 8 GiB.
    ram_weights = plan.weights_bytes - plan.offload_bytes
    assert ram_weights + plan.kv_cache_bytes + plan.reserve_bytes <= 8 * GiB
    assert "gpu_layers" in plan.overridden and "on disk" in plan.reasons["offload"]


def test_disk_offload_conflicts_are_refused():
    s = load_model_shape(CONFIGS / "starcoder2-3b")
    box = simulated_profile(ram="16GiB", cpu_only=True)
    with pytest.raises(PlanError, match="offload is off"):
        make_plan(s, box, overrides_from_flags(gpu_layers=3, cpu_offload=False))
    with pytest.raises(PlanError, match="NF4"):
        make_plan(s, box, overrides_from_flags(gpu_layers=3, quantization="nf4"))
    full = make_plan(s, box, overrides_from_flags(gpu_layers=999))  # every layer fits in RAM: no offload
    assert not full.offload and full.device_map is None


def test_gpu_layers_env_var():
    o = overrides_from_env({"GPU_LAYERS": "12"})
    assert o.gpu_layers == 12 and o.sources["gpu_layers"] == "GPU_LAYERS=12"
    with pytest.raises(ValueError):
        overrides_from_env({"GPU_LAYERS": "half"})
    assert resolve_overrides({"GPU_LAYERS": "12"}, gpu_layers=3).gpu_layers == 3  # a flag wins


def test_default_model_plan_on_this_machine(default_model_path):
    s = load_model_shape(default_model_path)
    box = msgspec.structs.replace(simulated_profile(cpu_only=True), cpu_bf16=False)
    plan = make_plan(s, box, overrides_from_env({"GPU_LAYERS": str(KEPT)}))
    assert _disk_layers(plan) == [f"model.layers.{i}" for i in range(KEPT, s.num_layers)]


# ---------------------------------------------------------------- the real path


@pytest.fixture(scope="module")
def offload_server(default_model_path):
    # float32: the batched check below needs batch-invariant numerics (bf16 rounding can differ by batch shape)
    yield from running_server(
        "--max-context", "512", "--max-batch", "4", "--dtype", "float32", env={"GPU_LAYERS": str(KEPT)}
    )


@pytest.mark.slow
def test_disk_offloaded_server_matches_transformers_greedy(offload_server, default_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = offload_server.info()["plan"]
    assert plan["offload"] is True and plan["device"] == "cpu"
    assert [k for k, v in plan["device_map"].items() if v == "disk"] == [f"model.layers.{i}" for i in range(KEPT, 30)]
    log = offload_server.log_path.read_text()
    assert f"{30 - KEPT} of 30 decoder layers offloaded" in log, offload_server.log()

    status, body = run(generate(offload_server.url, PROMPT))
    assert status == 200, body
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    dtype = torch_dtype(plan["dtype"])
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=dtype).eval()
    ids = tokenizer(PROMPT["prompt"], return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=PROMPT["max_new_tokens"], do_sample=False)[0, ids.shape[1] :]
    assert body["token_ids"] == expected.tolist()
    assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True)

    # A batch: several requests at once share steps (decode rows + prefill chunks through offloaded layers).
    async def many():
        async with aiohttp.ClientSession() as session:
            import asyncio

            return await asyncio.gather(
                *(post_json(session, offload_server.url + "/generate", PROMPT) for _ in range(3))
            )

    for status, again in run(many()):
        assert status == 200 and again["token_ids"] == body["token_ids"]
