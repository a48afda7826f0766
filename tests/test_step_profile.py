"""bench/step_profile.py on a synthetic GPU trace: each kernel found by its HLO instruction
(hlo_op stat, an annotation, or its own name), put in its model part and phase, per step."""

import pytest
from jax.profiler import ProfileData

from relu_sparsity.bench import step_profile

HLO = """
HloModule jit_train_step
ENTRY %main {
  %fusion.3 = bf16[8,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(Transformer)/block_0/mlp/mlp._hidden/relu"}
  %custom-call.7 = bf16[8,8]{1,0} custom-call(%a, %b), metadata={op_name="jit(train_step)/transpose(jvp(Transformer))/block_1/attn/qkv/dot_general"}
  %input_reduce_fusion.2 = f32[] fusion(%g), kind=kInput, metadata={op_name="jit(train_step)/optimizer/reduce_sum"}
  ROOT %copy.1 = f32[8]{0} copy(%x), metadata={op_name="state.params['block_0']['ln_mlp']['scale']"}
}
"""


def event(metadata_id: int, offset_us: float, duration_us: float, stats: str = "") -> str:
    return (f"events {{ metadata_id: {metadata_id} offset_ps: {int(offset_us * 1e6)} "
            f"duration_ps: {int(duration_us * 1e6)} {stats} }}")


def trace_file(tmp_path):
    # Two steps on one stream; a host thunk that must not count where a device plane exists.
    hlo_op = 'stats { metadata_id: 10 str_value: "fusion.3" }'
    annotation = ('stats { metadata_id: 11 str_value: '
                  '"custom-call.7:#hlo_op=custom-call.7,hlo_module=jit_train_step#" }')
    events = []
    for step in range(2):
        t = 100.0 * step
        events += [event(1, t, 30, hlo_op), event(2, t + 30, 20, annotation),
                   event(3, t + 50, 10), event(4, t + 60, 5), event(5, t + 65, 1)]
    text = f"""
    planes {{ id: 1 name: "/device:GPU:0"
      lines {{ id: 1 name: "Stream #13" timestamp_ns: 1000 {" ".join(events)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "loop_fusion_3" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "sm90_xmma_gemm_bf16bf16" }} }}
      event_metadata {{ key: 3 value {{ id: 3 name: "input_reduce_fusion_2" }} }}
      event_metadata {{ key: 4 value {{ id: 4 name: "copy_1" }} }}
      event_metadata {{ key: 5 value {{ id: 5 name: "some_library_kernel" }} }}
      stat_metadata {{ key: 10 value {{ id: 10 name: "hlo_op" }} }}
      stat_metadata {{ key: 11 value {{ id: 11 name: "kernel_annotation" }} }}
    }}
    planes {{ id: 2 name: "/host:CPU"
      lines {{ id: 1 name: "python" timestamp_ns: 0 {event(1, 0, 999, hlo_op)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "fusion.3" }} }}
      stat_metadata {{ key: 10 value {{ id: 10 name: "hlo_op" }} }}
    }}"""
    path = tmp_path / "host.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
    return path


def test_gpu_kernels_are_attributed_to_parts_and_phases(tmp_path):
    kernels, span_ns = step_profile.kernels(trace_file(tmp_path), HLO)
    summary = step_profile.summarize(kernels, steps=2, span_ns=span_ns)
    parts = summary["parts"]
    assert parts["MLP"] == {"forward": pytest.approx(0.030), "total": pytest.approx(0.030)}
    assert parts["attention"]["backward"] == pytest.approx(0.020)
    assert parts["optimizer"]["update"] == pytest.approx(0.010)
    assert parts["parameter copies"]["total"] == pytest.approx(0.005)
    assert parts["unattributed"]["unknown"] == pytest.approx(0.001)
    assert summary["device_ms_per_step"] == pytest.approx(0.066)  # the host thunk left out
    assert summary["span_ms_per_step"] == pytest.approx(0.166 / 2)
    assert [k["name"] for k in summary["kernels"]] == [
        "fusion.3", "custom-call.7", "input_reduce_fusion_2", "copy_1", "some_library_kernel"]
    assert all(k["calls_per_step"] == 1 for k in summary["kernels"])
    table = step_profile.format_summary(summary, top=2)
    assert "| MLP | 0.03 | 0.00 | 0.00 | 0.00 | 0.03 | 45.5% |" in table


def test_a_run_without_a_profile_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--profile-steps"):
        step_profile.profile_run(tmp_path)
