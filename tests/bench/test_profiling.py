"""The profiled step's GPU time by kernel class, and the speed bounds derived from it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from scca_eval.bench.profiling import (classify_kernel, kernel_breakdown, markdown_breakdown, profile_step,
                                       speed_bounds)
from scca_eval.cli.bench import bench

# Kernel names as the CUDA profiler reports them (PyTorch's own kernels, cuBLAS, and the
# names torch.compile gives the kernels it generates).
NAMES = {
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, true, false, false>": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "triton_tem_fused_flex_attention_0": "attention",
    "triton_tem_fused_flex_attention_backward_zeros_1": "attention",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
    "cublas": "matmul",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul",
    "triton_tem_fused_mm_3": "matmul",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_"
    "cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(c10::BFloat16)#1}> >": "layout",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
    "true>": "layout",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
    "unsigned int, 4, 64, 64>": "layout",
    "Memcpy DtoD (Device -> Device)": "layout",
    "triton_poi_fused_clone_index_select_2": "layout",
    "triton_poi_fused__to_copy_add_mul_rsqrt_0": "other",  # a norm that also casts: it computes
    "triton_red_fused__to_copy_mean_pow_1": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
    "at::detail::Array<char*, 3> >": "other",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
    "float>, unsigned int, float, 4, 4> >": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_names_fall_into_their_class(name):
    assert classify_kernel(name) == NAMES[name]


def test_breakdown_counts_overlapping_kernels_once_in_busy_time():
    kernels = [("flash_fwd_kernel", 0.0, 1000.0), ("sm90_xmma_gemm", 500.0, 1500.0),  # overlap 500 µs
               ("Memcpy DtoD", 2000.0, 2500.0), ("flash_fwd_kernel", 3000.0, 3250.0)]
    result = kernel_breakdown(kernels)
    assert result["busy_ms"] == pytest.approx(2.25)  # [0, 1.5] + [2, 2.5] + [3, 3.25]
    assert result["classes"] == pytest.approx({"attention": 1.25, "matmul": 1.0, "layout": 0.5, "other": 0.0})
    assert result["top"]["attention"] == [["flash_fwd_kernel", 1.25, 2]] and result["kernels"] == 4


def test_speed_bounds_replace_attention_by_its_ideal_and_by_nothing():
    full = {"classes": {"attention": 60.0, "matmul": 20.0, "layout": 2.0, "other": 10.0}}
    sparse = {"classes": {"attention": 50.0, "matmul": 20.0, "layout": 6.0, "other": 10.0}}
    bounds = speed_bounds(90.0, sparse, 100.0, full, attention_share=0.25)
    # the rest of the sparse step is 90 - 50 = 40 ms; ideal attention 60 x 0.25 = 15 ms;
    # full attention's step without its attention is 100 - 60 = 40 ms
    assert bounds["vs_full"] == pytest.approx(100 / 90)
    assert bounds["ideal_attention_ms"] == pytest.approx(15.0)
    assert bounds["vs_full_ideal_attention"] == pytest.approx(100 / 55)
    assert bounds["vs_full_ideal_pattern"] == pytest.approx(100 / 55)
    assert bounds["vs_full_free_attention"] == pytest.approx(100 / 40)
    slower = speed_bounds(95.0, sparse, 100.0, full, attention_share=0.25)  # 5 ms of host waits more
    assert slower["vs_full_ideal_attention"] == pytest.approx(100 / 60)
    assert slower["vs_full_ideal_pattern"] == pytest.approx(100 / 55)
    table = markdown_breakdown([{"ctx": 16, "pattern": "s2", "backend": "flex", "step_ms": 90.0,
                                 "profile": dict(sparse, busy_ms=85.0), "bounds": bounds}], "step")
    assert "| 16 | s2 | flex | 90.0 | 85.0 | 5.0 | 50.0 (15.0) | 20.0 | 6.0 | 10.0 | 1.11x | 1.82x | 1.82x | 2.50x |" in table
    assert "can gain" not in table  # no full-attention cell: no limit claimed
    with_full = markdown_breakdown([{"ctx": 16, "pattern": "full", "backend": "sdpa", "step_ms": 100.0,
                                     "profile": dict(full, busy_ms=95.0)}], "step")
    assert "here (its step without its attention kernels): 16: 2.50x." in with_full  # 100 / (100 - 60)


def test_profile_step_off_a_gpu_reports_host_time_only(tmp_path):
    table = tmp_path / "step.txt"
    a = torch.randn(64, 64)
    profiled = profile_step(lambda: a @ a, torch.device("cpu"), table)
    assert profiled["gpu_ms"] is None and "busy_ms" not in profiled and profiled["host_ms"] > 0
    assert profiled["compiled_entries"] == profiled["compiled_regions"] == 0  # nothing compiled here
    assert "aten::mm" in table.read_text() and profiled["table"] == "step.txt"


def test_bench_model_profiles_one_more_engine_run_per_cell(tmp_path):
    config, out, folder = tmp_path / "tiny.json", tmp_path / "model.json", tmp_path / "profiles"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}))
    result = CliRunner().invoke(bench, ["model", "--shape", str(config), "--ctx", "64", "--pattern", "full,s2",
                                        "--tokens-per-run", "128", "--repeats", "1", "--no-plain", "--device", "cpu",
                                        "--profile", str(folder), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert sorted(path.name for path in folder.iterdir()) == ["64-full-sdpa.txt", "64-s2-auto.txt"]
    for row in rows:
        assert row["profile"]["host_ms"] > 0 and row["profile"]["gpu_ms"] is None
        assert row["attention_flops"] > 0
    # no GPU, no kernel classes: the breakdown table is not printed with made-up figures
    assert "Where the GPU time" not in result.output


def test_bench_model_profile_counts_compiled_regions_alike_for_every_pattern(tmp_path):
    """A compiled layer that traces whole is entered once per call as one region, under a
    sparse pattern as under full attention; a graph break would add regions (the engine
    once traced the second cell's layers before building its pattern's layout)."""
    config, out = tmp_path / "tiny.json", tmp_path / "model.json"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}))
    result = CliRunner().invoke(bench, ["model", "--shape", str(config), "--ctx", "64", "--pattern", "full,longmixed",
                                        "--backend", "strided", "--tokens-per-run", "128", "--repeats", "1",
                                        "--no-plain", "--compile", "--device", "cpu", "--profile", str(tmp_path / "p"),
                                        "--json", str(out)])
    assert result.exit_code == 0, result.output
    profiles = {row["pattern"]: row["profile"] for row in json.loads(out.read_text())["rows"]}
    assert profiles["full"]["compiled_entries"] > 0
    assert profiles["longmixed"]["compiled_entries"] == profiles["full"]["compiled_entries"]
    assert profiles["longmixed"]["compiled_regions"] == profiles["full"]["compiled_regions"]
    assert "Compiled code entered" in (tmp_path / "p" / "64-longmixed-strided.txt").read_text()


@pytest.mark.gpu
def test_profile_step_on_a_gpu_splits_attention_from_matmuls(tmp_path):
    device = torch.device("cuda")
    q = torch.randn(1, 4, 2048, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        w @ w
        q.transpose(1, 2).contiguous()

    step()
    profiled = profile_step(step, device, tmp_path / "step.txt")
    classes = profiled["classes"]
    assert classes["attention"] > 0 and classes["matmul"] > 0 and classes["layout"] > 0
    assert profiled["busy_ms"] <= profiled["gpu_ms"] + 1e-6
    assert sum(classes.values()) == pytest.approx(profiled["gpu_ms"])
