"""The hardware plan (``hardware.plan``): box profiles from a laptop to a GPU workstation, without
the machine; the GGUF header reader it sizes models by; and the plan a real server applies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hardware.detect import CgroupLimits, CpuInfo, HardwareInfo, MemoryInfo
from hardware.fallbacks import EngineCaps, fallback_warnings
from hardware.nvml import GpuInfo, GpuStatus
from hardware.plan import EmbeddingOverrides, ModelAsk, make_plan
from hardware.tuning import LlmOverrides, LlmShape
from models.gguf import GgufError, llm_shape, read_gguf

GIB = 1024**3
MIB = 1024**2
SMOL = LlmShape(file_bytes=98_362_432, n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ctx_train=8192)
# A 7B model in Q4_K_M (Mistral-7B's shape: grouped-query attention, 8 KV heads).
SEVEN_B = LlmShape(file_bytes=int(4.07 * GIB), n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ctx_train=32768)
CPU_ONLY = EngineCaps(False, frozenset({"AVX2"}), ("CPUExecutionProvider",))
CUDA = EngineCaps(True, frozenset({"AVX2", "CUDA"}), ("CUDAExecutionProvider", "CPUExecutionProvider"))


def box(cores: int, ram_gib: float, *, logical: int | None = None, quota: float | None = None,
        mem_limit_gib: float | None = None, gpu_gib: float | None = None, gpu_used_gib: float = 0.0) -> HardwareInfo:
    gpus: tuple[GpuInfo, ...] = ()
    if gpu_gib is not None:
        gpus = (GpuInfo(index=0, name="NVIDIA RTX", uuid="GPU-0", memory_total_bytes=int(gpu_gib * GIB),
                        memory_free_bytes=int((gpu_gib - gpu_used_gib) * GIB), compute_capability="8.9"),)
    return HardwareInfo(
        cpu=CpuInfo("Test CPU", "x86_64", cores, logical or cores, logical or cores, ("avx", "avx2")),
        memory=MemoryInfo(int(ram_gib * GIB), int(ram_gib * GIB * 0.9)),
        cgroup=CgroupLimits("v2" if quota or mem_limit_gib else None, quota,
                            int(mem_limit_gib * GIB) if mem_limit_gib else None, 0 if mem_limit_gib else None),
        gpu=GpuStatus(gpus, "580.65.06", "13.0", None if gpus else "NVML found no GPU"),
    )


def catalog(chat: LlmShape = SMOL, **llm: int) -> list[ModelAsk]:
    return [
        ModelAsk("chat", "chat", shape=chat, file_bytes=chat.file_bytes, llm=LlmOverrides(**llm)),
        ModelAsk("minilm", "embedding", file_bytes=23 * MIB, max_tokens_per_input=256),
        ModelAsk("triage", "classifier", depends_on="minilm"),
    ]


def test_a_4_core_8_gb_laptop_runs_everything_on_the_cpu_with_a_reason_for_each_setting() -> None:
    plan = make_plan(box(4, 8, logical=8), CPU_ONLY, catalog())
    chat, emb, tri = plan.models
    assert (chat.device, chat.settings["threads"], chat.settings["slots"], chat.settings["gpu_layers"]) == ("cpu", 4, 16, 0)
    assert chat.settings["kv_tokens_per_slot"] == 4096 and chat.settings["max_waiting"] == 64
    assert set(chat.reasons) >= {"threads", "gpu_layers", "slots", "kv_tokens", "batch_tokens", "max_waiting"}
    assert "4 usable cores" in chat.reasons["threads"] and "no NVIDIA GPU" in chat.reasons["gpu_layers"]
    assert (emb.device, emb.settings["provider"], emb.settings["max_batch_requests"]) == ("cpu", "CPUExecutionProvider", 32)
    assert tri.device.startswith("cpu") and not tri.refused
    assert plan.warnings == () and "chat on cpu (4 threads, 16 slots" in plan.summary()


def test_a_2_core_24_gb_vm() -> None:
    chat = make_plan(box(2, 24), CPU_ONLY, catalog()).models[0]
    assert (chat.settings["threads"], chat.settings["slots"], chat.settings["kv_tokens"]) == (2, 8, 8 * 4096)


def test_a_64_core_host_inside_a_2_cpu_container_plans_for_the_container() -> None:
    hw = box(64, 256, logical=128, quota=2.0, mem_limit_gib=0.6)
    plan = make_plan(hw, CPU_ONLY, catalog())
    chat = plan.models[0]
    assert chat.settings["threads"] == 2 and "cgroup quota 2 CPUs" in chat.reasons["threads"]
    assert chat.settings["slots"] == 8
    # 600 MiB of container memory, not 230 GiB of host RAM: the KV cache was halved to fit.
    assert chat.settings["kv_tokens_per_slot"] < 4096 and "halved" in chat.reasons["kv_tokens"]
    assert sum(m.host_bytes for m in plan.models) <= 0.6 * GIB


def test_a_24_gb_gpu_takes_a_7b_model_whole() -> None:
    plan = make_plan(box(8, 32, gpu_gib=24), CUDA, catalog(SEVEN_B))
    chat, emb, _ = plan.models
    assert chat.device == "cuda:0" and chat.settings["gpu_layers"] == SEVEN_B.n_layer + 1
    assert chat.settings["batch_tokens"] == 2048 and "all 32 layers and the output" in chat.reasons["gpu_layers"]
    assert chat.gpu_bytes <= plan.gpu_room_bytes and chat.host_bytes < 200 * MIB
    assert emb.settings["provider"] == "CUDAExecutionProvider" and emb.device == "cuda:0"
    assert plan.warnings == ()


def test_a_4_gb_gpu_takes_part_of_a_7b_model_and_says_so_with_the_numbers() -> None:
    plan = make_plan(box(8, 32, gpu_gib=4), CUDA, catalog(SEVEN_B))
    chat = plan.models[0]
    layers = chat.settings["gpu_layers"]
    assert chat.device == "cuda:0+cpu" and 0 < layers < SEVEN_B.n_layer
    assert chat.gpu_bytes <= plan.gpu_room_bytes  # 90 % of free less the reserve
    assert chat.gpu_bytes + chat.host_bytes >= SEVEN_B.file_bytes
    assert f"{layers} of 32 layers (partial offload)" in chat.reasons["gpu_layers"]
    (warning,) = plan.warnings
    assert "chat runs partly on the CPU" in warning and "GiB" in warning or "MiB" in warning


def test_a_gpu_already_full_runs_the_model_on_the_cpu_with_a_warning() -> None:
    plan = make_plan(box(8, 32, gpu_gib=8, gpu_used_gib=7.8), CUDA, catalog(SEVEN_B))
    chat = plan.models[0]
    assert chat.device == "cpu" and chat.settings["gpu_layers"] == 0
    assert "not one layer fits" in chat.reasons["gpu_layers"]
    assert plan.warnings and "runs on the CPU although" in plan.warnings[0]


def test_a_cpu_only_wheel_on_a_gpu_host_plans_the_cpu_and_warns() -> None:
    hw = box(8, 32, gpu_gib=24)
    plan = make_plan(hw, CPU_ONLY, catalog(SEVEN_B))
    chat, emb, _ = plan.models
    assert chat.device == "cpu" and "CPU-only build" in chat.reasons["gpu_layers"]
    assert emb.settings["provider"] == "CPUExecutionProvider" and "no CUDA execution provider" in emb.reasons["provider"]
    warnings = fallback_warnings(hw, CPU_ONLY)
    assert any("cannot offload" in w and "GGML_CUDA=on" in w for w in warnings)


def test_a_model_that_cannot_fit_is_refused_with_needed_against_available_and_the_rest_still_planned() -> None:
    asks = [ModelAsk("big", "chat", shape=SEVEN_B, file_bytes=SEVEN_B.file_bytes)] + catalog()
    plan = make_plan(box(4, 4), CPU_ONLY, asks)  # 3.6 GiB available, 4.07 GiB of weights
    big = plan.get("big")
    assert big is not None and big.refused and "needs about" in big.refused and "available" in big.refused
    assert all(not m.refused for m in plan.models[1:])
    assert "big refused" in plan.summary()


def test_models_share_the_memory_in_load_order() -> None:
    # Two 7B models in 6.3 GiB usable: the first fits, the second finds only what the first left.
    asks = [ModelAsk(f"m{i}", "chat", shape=SEVEN_B, file_bytes=SEVEN_B.file_bytes) for i in range(2)]
    plan = make_plan(box(8, 7), CPU_ONLY, asks)
    first, second = plan.models
    assert not first.refused and second.refused
    assert f"only {(plan.host_room_bytes - first.host_bytes) // MIB} MiB" in second.refused


def test_two_chat_models_share_the_cores_and_explicit_settings_are_kept() -> None:
    asks = [ModelAsk("a", "chat", shape=SMOL, file_bytes=SMOL.file_bytes),
            ModelAsk("b", "chat", shape=SMOL, file_bytes=SMOL.file_bytes, llm=LlmOverrides(threads=3, slots=5))]
    a, b = make_plan(box(8, 32), CPU_ONLY, asks).models
    assert a.settings["threads"] == 4 and "shared by 2 chat models" in a.reasons["threads"]
    assert (b.settings["threads"], b.settings["slots"]) == (3, 5)
    assert b.reasons["threads"] == b.reasons["slots"] == "set in the config"


def test_explicit_gpu_layers_that_cannot_fit_refuse_the_model() -> None:
    plan = make_plan(box(8, 32, gpu_gib=4), CUDA, catalog(SEVEN_B, gpu_layers=-1))
    assert plan.models[0].refused and "gpu_layers = -1" in plan.models[0].refused
    cpu = make_plan(box(8, 32), CPU_ONLY, catalog(SMOL, gpu_layers=10))
    assert cpu.models[0].refused and "no NVIDIA GPU" in cpu.models[0].refused


def test_a_classifier_whose_embedding_model_is_refused_is_refused_too() -> None:
    asks = [ModelAsk("minilm", "embedding", file_bytes=23 * MIB, embedding=EmbeddingOverrides(threads=1)),
            ModelAsk("triage", "classifier", depends_on="minilm")]
    plan = make_plan(box(1, 0.05), CPU_ONLY, asks)
    assert plan.models[0].refused and plan.models[1].refused and "'minilm'" in plan.models[1].refused


def test_an_unreadable_model_file_is_left_out_with_its_reason() -> None:
    plan = make_plan(box(2, 8), CPU_ONLY, [ModelAsk("gone", "chat", problem="/x.gguf cannot be read")])
    assert plan.models[0].device == "-" and "cannot be read" in plan.models[0].reasons["model"]
    assert json.loads(json.dumps(plan.to_dict()))["models"]["gone"]["device"] == "-"


# -- the GGUF header ----------------------------------------------------------------------------

def test_the_gguf_reader_gives_the_shape_llama_cpp_gives(smol_path: Path) -> None:
    from models.llama_runner import LlamaModel

    model = LlamaModel(smol_path)  # (a vocab-only model aborts in llama_model_n_layer: never ask it its shape)
    try:
        assert llm_shape(smol_path) == model.shape()
    finally:
        model.close()
    info = read_gguf(smol_path)
    assert info.architecture == "llama" and info.metadata["tokenizer.ggml.tokens"] == 49152


def test_not_gguf_and_truncated_files_are_clear_errors(tmp_path: Path, smol_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_gguf(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_path.read_bytes()[:50_000])
    with pytest.raises(GgufError, match="truncated"):
        read_gguf(cut)


# -- the plan on this machine ------------------------------------------------------------------

def test_hardware_plan_cli_prints_each_setting_with_its_reason() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "hardware", "--plan"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m-instruct" in out.stdout and "usable cores" in out.stdout and out.stdout.count("\n") > 10
    js = subprocess.run([sys.executable, "-m", "server", "hardware", "--plan", "--json"], capture_output=True, text=True, timeout=60)
    plan = json.loads(js.stdout)["plan"]
    assert plan["models"]["smollm2-135m-instruct"]["settings"]["threads"] >= 1
    assert plan["summary"].startswith("plan: ")


def test_the_server_applies_the_plan_it_reports(server) -> None:  # type: ignore[no-untyped-def]
    info = httpx.get(server.url + "/admin/hardware").json()
    planned = info["plan"]["models"]
    for model_id in ("smollm2-135m-instruct", "minilm-l6-v2"):
        loaded = info["models"][model_id]["settings"]
        for key in ("threads", "slots", "batch_tokens", "max_waiting", "max_batch_requests", "provider"):
            if key in planned[model_id]["settings"] and key in loaded:
                assert loaded[key] == planned[model_id]["settings"][key], (model_id, key)
    assert "plan: smollm2-135m-instruct on cpu" in server.log()


def test_a_models_own_head_size_sizes_its_kv_cache() -> None:
    # Qwen3-0.6B: n_embd / n_head is 64, but its heads are 128 wide (attention.key_length).
    qwen = LlmShape(file_bytes=400 * MIB, n_layer=28, n_embd=1024, n_head=16, n_head_kv=8, n_ctx_train=40960,
                    key_length=128, value_length=128)
    guessed = LlmShape(**{**qwen.__dict__, "key_length": None, "value_length": None})
    assert qwen.kv_bytes_per_token == 2 * guessed.kv_bytes_per_token == 28 * 8 * 256 * 2


def test_a_corrupt_gguf_header_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    import struct

    bad = tmp_path / "bad.gguf"
    key = b"general.architecture"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                    + struct.pack("<IIQ", 9, 8, 2**62))  # an array of 2**62 strings
    with pytest.raises(GgufError):
        read_gguf(bad)
