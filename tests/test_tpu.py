"""Compiling for a TPU that is not here: the cost estimate read from compiled HLO, and the tpu
preset compiled by libtpu for a v5e (what `bench --topology` does)."""
import importlib.util
import json

import pytest

from conftest import run_cli, run_cli_many, run_main, tiny_config
import tinytpu as tt

# A compiled module as libtpu prints it, cut down: a loop run 4 times around a fusion of 1,000
# estimated cycles, a splash kernel call whose metadata runs over two lines (its '}}' must not
# end the computation), an all-reduce, an all-gather run as a fusion the cost model does not
# price and one inside a fusion it does (100 cycles), and 500 cycles outside the loop with a
# reduce-scatter, two all-reduces XLA combined into one, and a collective permute.
HLO = '''HloModule jit_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[]{:T(128)} constant(4)
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.1), direction=LT
}

%body (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p.1), index=1
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%f, backend_config={"estimated_cycles":"1000"}
  %splash_mqa_fwd_residuals.3 = (bf16[8]{0}) custom-call(%fusion.1), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{}"
}}, metadata={op_name="splash_mqa_fwd"}
  %all-reduce.2 = f32[8]{0} all-reduce(%fusion.1), replica_groups={{0,1}}, to_apply=%add
  %async-collective-start = (bf16[4]{0}, bf16[8]{0}) fusion(%fusion.1), kind=kCustom, calls=%gather
  %fusion.3 = bf16[8]{0} fusion(%fusion.1), kind=kOutput, calls=%gather, backend_config={"estimated_cycles":"100"}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i.2, %all-reduce.2)
}

%gather (q: bf16[4]) -> bf16[8] {
  %q = bf16[4]{0} parameter(0)
  ROOT %all-gather.1 = bf16[8]{0} all-gather(%q), dimensions={0}
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %while.1 = (s32[], f32[8]{0}) while(%t.0), condition=%cond, body=%body
  %reduce-scatter.1 = bf16[4]{0} reduce-scatter(%a), dimensions={0}, to_apply=%add
  %all-reduce.3 = (f32[8]{0}, f32[4]{0}) all-reduce(%a, %a), to_apply=%add
  %collective-permute-start.1 = (bf16[8]{0}, bf16[8]{0}, u32[], u32[]) collective-permute-start(%a)
  ROOT %fusion.2 = f32[8]{0} fusion(%while.1), kind=kLoop, calls=%g, backend_config={"estimated_cycles":"500"}
}
'''


class Compiled:
    def as_text(self):
        return HLO


def test_estimate_counts_loop_iterations_kernels_and_collectives():
    chip = tt.Chip('test', 'test', peak=1e6, price=1.0, memory=1, clock=1e3, ici=8.0)
    est = tt.estimate_step(Compiled(), chip, n_devices=2, kernel_flops={'dkv': 7, 'fwd': 100})
    assert est['xla_seconds'] == pytest.approx((4 * (1000 + 100) + 500) / 1e3)  # cycles / clock
    assert est['kernel_seconds'] == pytest.approx(4 * 100 / (1e6 * tt.KERNEL_EFFICIENCY))
    # an all-reduce crosses the links twice (reduce-scatter, all-gather): 2 * 32 bytes * (n-1)/n;
    # an all-gather of 16 bytes once: 16 * (n-1)/n; both gathers move bytes, the priced one's time
    # is in its cycles already
    all_reduce, gather = 2 * 32 * 1 / 2, 16 * 1 / 2
    # outside the loop: a reduce-scatter to bf16[4] reduces 16 bytes: 16 * (n-1)/n; two arrays
    # all-reduced together (48 bytes): 2 * 48 * (n-1)/n; a collective permute sends its 16 bytes
    once = 16 * 1 / 2 + 2 * 48 * 1 / 2 + 16
    assert est['collective_bytes'] == 4 * (all_reduce + 2 * gather) + once
    assert est['collective_seconds'] == pytest.approx((4 * (all_reduce + gather) + once) / 8.0)
    assert est['seconds'] == pytest.approx(est['xla_seconds'] + est['kernel_seconds'] + est['collective_seconds'])
    assert est['costliest'] == [('f32[8] fusion', pytest.approx(4.5)), ('bf16[8] fusion', pytest.approx(0.4))]
    one_chip = tt.estimate_step(Compiled(), chip, n_devices=1, kernel_flops={})
    assert one_chip['collective_bytes'] == 0 and one_chip['kernel_seconds'] == 0


def test_splash_flops_count_the_causal_blocks_of_each_kernel():
    c = tiny_config(n_head=4, n_kv_head=1, d_head=128, seq_len=512, context=512, batch_size=8, grad_accum=2)

    class Mesh:
        size = 2
    flops = tt.splash_flops(c, Mesh)
    # 2 sequences per device, 4 heads, one 512 x 512 x 128 matmul = 2*512*512*128 FLOPs, of whose
    # 1 block of 512 the causal kernel computes all (the diagonal block is computed whole)
    per_matmul = 2 * 4 * 2 * 512 * 512 * 128
    assert flops == {'dkv': 4 * per_matmul, 'dq': 3 * per_matmul, 'fwd': 2 * per_matmul}
    long = tiny_config(n_head=4, n_kv_head=1, d_head=128, seq_len=2048, context=2048, batch_size=8, grad_accum=2)
    # blocks of 1024 there (measured fastest), priced as the 10 of 16 blocks of 512 would be, scaled by the
    # time measured for each: 1.35 ms against 1.44
    assert tt.splash_block(2048) == 1024 and tt.splash_block(1536) == 512 and tt.splash_block(384) == 128
    assert tt.splash_flops(long, Mesh)['fwd'] == pytest.approx(2 * 2 * 4 * 2 * 2048 ** 2 * 128 * 5 / 8 * 1.35 / 1.44)


def test_plan_uses_a_topology_estimate_and_says_so(tmp_path, capsys):
    record = {'chip': 'v6e', 'topology': 'v6e:1x1', 'est_mfu': 0.3}
    (tmp_path / 'bench.jsonl').write_text(json.dumps(record) + '\n')
    r = run_main(capsys, 'plan', '--budget=5', '--hardware=v6e', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert 'MFU 30.0% (ESTIMATED by bench --topology' in r.stdout
    calibrated = record | {'est_mfu': 0.28, 'projected_mfu': 0.28 * 1.36}  # an estimate, and its projection
    (tmp_path / 'bench.jsonl').write_text(json.dumps(record) + '\n' + json.dumps(calibrated) + '\n')
    assert 'MFU 38.1% (PROJECTED: bench --topology' in run_main(capsys, 'plan', '--budget=5', '--hardware=v6e',
                                                                       f'--out={tmp_path}').stdout
    (tmp_path / 'bench.jsonl').write_text(json.dumps(calibrated) + '\n' + json.dumps({'chip': 'v6e', 'mfu': 0.25}) + '\n')
    assert 'MFU 25.0% (measured by bench' in run_main(capsys, 'plan', '--budget=5', '--hardware=v6e',
                                                        f'--out={tmp_path}').stdout


def test_topology_is_only_for_bench(tmp_path, capsys):
    r = run_main(capsys, '--topology=v5e:1x1', f'--out={tmp_path}')
    assert r.returncode == 2 and r.stderr.strip() == 'error: --topology is for bench (python tinytpu.py bench --topology=v5e:1x1)'


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu not installed (pip install "jax[tpu]"; CI installs it)')


@needs_libtpu
def test_unknown_topology_is_one_line(tmp_path):
    names = {'v9z:1x1': 'not a TPU slice libtpu knows', 'v3:2x2': 'the hardware table has no TPU v3'}
    results = run_cli_many(*(['bench', '--preset=tpu', f'--topology={name}', f'--out={tmp_path}'] for name in names),
                           devices=1)  # one process: libtpu loads once
    for (name, says), r in zip(names.items(), results):
        assert r.returncode == 2 and f'error: --topology={name}: {says}' in r.stderr, r.stderr


@pytest.mark.slow(seconds=45)
@needs_libtpu
def test_tpu_preset_train_and_eval_steps_fit_a_v5e(tmp_path):
    """libtpu compiles the tpu preset's train and eval steps for a v5e (16 GiB) with the 16
    microbatches of 4 that `--grad_accum=0` settles on there, both steps within its memory, read
    by the code path `bench --topology` and training share. Scanned layers keep this to 45 s on 2
    cores (the preset unrolls them: minutes). Letting the search find them compiles the train
    step a third time (8 microbatches, which do not fit: 40 s more); the search itself is tested
    on CPU against a device memory made small (test_robustness.py)."""
    r = run_cli('bench', '--preset=tpu', '--topology=v5e:1x1', '--scan_layers=true', '--grad_accum=16',
                f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result['topology'] == 'v5e:1x1' and result['chip'] == 'v5e' and result['attention'] == 'splash'
    assert result['device_bytes'] == 16 * 2**30 and result['fits'] == {'train': True, 'eval': True}
    assert 0 < result['eval_bytes_per_device'] < result['train_bytes_per_device'] <= 16 * 2**30
    assert result['grad_accum'] == 16 and result['microbatch'] == 4
    assert result['collective_bytes_per_step'] == 0 and result['est_ms_collectives'] == 0
    assert result['est_ms_per_step'] > 0 and 0 < result['est_mfu'] < 1
    assert result['est_tokens_per_sec'] == pytest.approx(64 * 2048 / result['est_ms_per_step'] * 1000)
    assert 'ESTIMATE' in r.stdout and 'not a measurement' in r.stdout
    dollars = lambda price: f"${price / 3600 / result['est_tokens_per_sec'] * 1e6:.2g}"  # per million tokens
    assert (f"per million tokens: {dollars(1.2)} at $1.2/chip-hour on-demand, {dollars(0.4692)} at $0.4692/chip-hour "
            'spot') in r.stdout
    assert json.loads((tmp_path / 'bench.jsonl').read_text().splitlines()[-1])['est_mfu'] == result['est_mfu']
    # the projection: the estimate / 1.35 for a v5e, labelled as such, beside it in the JSON
    assert result['calibration'] == 1.35 and result['projected_mfu'] == pytest.approx(result['est_mfu'] * 1.35)
    assert result['projected_tokens_per_sec'] == pytest.approx(result['est_tokens_per_sec'] * 1.35)
    assert "PROJECTION (the estimate / 1.35" in r.stdout and f"{result['projected_ms_per_step']:.1f} ms/step" in r.stdout
