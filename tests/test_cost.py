"""Hardware table, dollars in the training log, and the budget planner."""
import json

import pytest

import tinytpu as tt
from conftest import run_main, tiny_config, train


def test_device_kinds_find_their_chip():
    """jax's device_kind strings; the first match wins, so the longer names must come first."""
    kinds = {'TPU v6 lite': 'v6e', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v5p': 'v5p', 'TPU v4': 'v4',
             'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA H100 PCIe': 'h100-pcie', 'NVIDIA H200': 'h200',
             'NVIDIA A100-SXM4-80GB': 'a100'}
    for kind, name in kinds.items():
        assert tt.this_chip(kind).name == name, kind
    assert tt.this_chip('cpu') is None and tt.this_chip('NVIDIA GeForce RTX 4090') is None
    assert all(chip.peak > 0 and chip.memory > 0 for chip in tt.CHIPS)


def test_hourly_price_from_the_table_or_the_flag(monkeypatch):
    mesh = tt.make_mesh(tiny_config())
    price, note = tt.hourly_price(tiny_config(), mesh)
    assert price is None and '--price_per_hour' in note  # a CPU has no list price
    assert tt.hourly_price(tiny_config(price_per_hour=0.5), mesh)[0] == 0.5  # one machine
    monkeypatch.setattr(tt, 'this_chip', lambda kind=None: tt.CHIPS[0])
    price, note = tt.hourly_price(tiny_config(), mesh)
    assert price == tt.CHIPS[0].price and 'v6e on-demand list price' in note
    price, note = tt.hourly_price(tiny_config(spot=True), mesh)
    assert price == 0.6483 and note == '1 chips x $0.6483/chip-hour (v6e spot list price)'
    assert tt.hourly_price(tiny_config(spot=True, price_per_hour=0.5), mesh)[0] == 0.5  # the flag still wins
    monkeypatch.setattr(tt, 'this_chip', lambda kind=None: tt.chip_named('h100'))
    price, note = tt.hourly_price(tiny_config(spot=True), mesh)
    assert price is None and note.startswith('no spot price') and '--price_per_hour' in note


def test_every_tpu_has_a_spot_price_below_its_on_demand_one():
    for chip in tt.CHIPS:
        assert 0 <= chip.spot < chip.price or not chip.price, chip.name
        assert chip.spot or not chip.clock, f'{chip.name}: a TPU without a spot price'


@pytest.mark.slow
def test_cost_in_the_log_and_the_summary(byte_data, tmp_path):
    """$3.6 per hour is $0.001 per second of wall time; resuming carries the time (so the
    dollars) of the earlier run on."""
    c = tiny_config(data=byte_data, out=str(tmp_path), steps=4, ckpt_every=4, price_per_hour=3.6,
                    warmdown_frac=0.0)  # a constant LR: 6 steps continue the 4-step run from its end
    train(c)
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    for r in records[:-1] + [records[-1]['summary']]:
        assert r['cost'] == pytest.approx(r['elapsed'] / 1000, rel=1e-12)
    assert records[-1]['step'] == 4
    summary = records[-1]['summary']
    assert summary['tokens'] == 4 * 4 * 16 and summary['val_loss'] == records[-2]['val_loss']
    assert 0 < summary['mfu'] < 1
    saved = json.load(open(tmp_path / 'ckpt_00000004' / 'meta.json'))['elapsed']
    assert 0 < saved <= summary['elapsed']
    train(tt.dataclasses.replace(c, steps=6))
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['step'] for r in records if 'summary' in r] == [4, 6]
    resumed = records[-1]['summary']
    assert resumed['tokens'] == 6 * 4 * 16 and resumed['elapsed'] > saved
    assert resumed['cost'] == pytest.approx(resumed['elapsed'] / 1000, rel=1e-12)


def test_plan_matches_a_hand_computation():
    """$3.6/hour at 1e12 FLOP/s x MFU 0.5 buys 5e14 FLOPs per dollar. The tpu preset trains on
    64 x 2048 = 131,072 tokens per step with a vocabulary padded to 50,304, and a SwiGLU MLP.
    Rung 1: 1 layer, d_model 128, 1 head of 128, MLP 384 (3 matrices).
      matmul params = 128*128*2 (q, o) + 128*128*2 (k, v) + 128*384*3 (MLP) + 128*50304 = 6,651,904
      20 tokens each = 133,038,080 = 1,015 steps exactly
      FLOPs/token = 6 * 6,651,904 + 12 * 1 * 1 * 128 * 2048 = 43,057,152
      cost = 133,038,080 * 43,057,152 / 5e14 = $11.4565; hours = that / 5e11 / 3600 = 3.18236
    Rung 2 (2 layers, d_model 128): 6,864,896 params -> 1,048 steps -> $13.0443, over a $12 budget."""
    c = tt.validate(tt.make_config({'preset': 'tpu', 'budget': 12.0, 'price_per_hour': 3.6, 'peak_flops': 1e12,
                                    'mfu': 0.5}))
    p = tt.make_plan(c, tt.CHIPS[0])
    m = p['config']
    assert (m.n_layer, m.d_model, m.n_head, m.n_kv_head, tt.head_dim(m), tt.ff_dim(m)) == (1, 128, 1, 1, 128, 384)
    assert m.mlp == 'swiglu' and p['params'] == 6_651_904 and p['steps'] == 1015 and p['tokens'] == 133_038_080
    assert p['flops'] == 133_038_080 * 43_057_152
    assert p['cost'] == pytest.approx(133_038_080 * 43_057_152 / 5e14, rel=1e-12) == pytest.approx(11.4565, abs=1e-4)
    assert p['hours'] == pytest.approx(3.18236, abs=1e-5)
    assert p['chip_hours'] == pytest.approx(12 / 3.6) and p['budget_flops'] == pytest.approx(12 * 5e14)
    bigger = tt.make_plan(tt.dataclasses.replace(c, budget=13.5, chips=4), tt.CHIPS[0])
    assert bigger['config'].n_layer == 2 and bigger['steps'] == 1048
    assert bigger['cost'] == pytest.approx(1048 * 131072 * 47_480_832 / 5e14, rel=1e-12)
    assert bigger['hours'] == pytest.approx(bigger['flops'] / (4 * 5e11) / 3600, rel=1e-12)  # 4 chips


def test_plan_spends_the_budget_on_twenty_tokens_per_param(tmp_path):
    for budget in (5, 50, 500):  # --out: no bench.jsonl there (out/tpu's, from a bench run here, would set the MFU)
        c = tt.validate(tt.make_config({'budget': float(budget), 'hardware': 'v6e', 'out': str(tmp_path)}, 'tpu'))
        p = tt.make_plan(c, tt.CHIPS[0])
        assert 20 <= p['tokens'] / p['params'] < 20 + 64 * 2048 / p['params']  # rounded up to whole steps
        assert 0.6 * budget < p['cost'] <= budget  # the next rung is ~1.2-1.5x larger
        m = p['config']
        assert m.d_model % 128 == 0 and tt.head_dim(m) == 128 and abs(m.d_model / m.n_layer - 64) <= 64


def test_damaged_bench_records_are_skipped(tmp_path):
    """Lines plan cannot use (not JSON, a string or boolean MFU, out of range, not an object) are
    skipped; the last good one counts."""
    lines = [json.dumps({'chip': 'v5e', 'mfu': 0.3}), '{"chip": "v5e", "mfu": ', json.dumps({'chip': 'v5e', 'mfu': 'fast'}),
             json.dumps({'chip': 'v5e', 'mfu': True}), json.dumps({'chip': 'v5e', 'mfu': 7}), '[1, 2]', '\xff\xfe']
    (tmp_path / 'bench.jsonl').write_text('\n'.join(lines) + '\n', encoding='latin-1')
    c = tt.validate(tt.make_config({'budget': 40.0, 'hardware': 'v5e', 'out': str(tmp_path)}, 'tpu'))
    mfu, how = tt.bench_mfu(c, tt.chip_named('v5e'))
    assert mfu == 0.3 and how.startswith('measured by bench')


def test_plan_command_prints_a_runnable_command(tmp_path, capsys):
    (tmp_path / 'bench.jsonl').write_text(json.dumps({'chip': 'v5e', 'mfu': 0.25}) + '\n')
    r = run_main(capsys, 'plan', '--budget=40', '--hardware=v5e', f'--out={tmp_path}')
    assert r.returncode == 0, r.stderr
    assert 'MFU 25.0% (measured by bench' in r.stdout and '$1.2/chip-hour' in r.stdout
    command = r.stdout.strip().splitlines()[-1].split()
    assert command[:2] == ['python', 'tinytpu.py']
    c = tt.validate(tt.make_config(tt.parse_flags(command[2:])))
    expected = tt.make_plan(tt.validate(tt.make_config({'budget': 40.0, 'hardware': 'v5e', 'mfu': 0.25}, 'tpu')),
                            tt.CHIPS[1])
    assert c.preset == 'tpu' and tt.matmul_params(c) == expected['params'] and c.steps == expected['steps']
    # fp32 params and two AdamW moments; with tied embeddings every parameter is a matmul weight
    assert f"params + Muon (matrices) and AdamW {12 * expected['params'] / 2**30:,.1f} GiB per chip of 16 GiB" in r.stdout
    assert c.mlp == 'swiglu' and '--mlp=relu2' not in r.stdout  # the preset's MLP, not another
    shards = -(-expected['tokens'] // 100_000_000)  # FineWeb shards of 100M tokens: all the run reads
    assert f'(after python prepare.py fineweb10B --shards={shards}):' in r.stdout and shards > 1


def test_plan_shows_on_demand_and_spot_side_by_side(capsys):
    """Both list prices, the chosen one marked; --spot plans the larger model the cheaper hours buy
    and passes --spot on, so the run's log prices its hours the same way."""
    on_demand, spot = [run_main(capsys, 'plan', '--budget=50', '--hardware=v5e', *extra) for extra in ([], ['--spot=true'])]
    for r in (on_demand, spot):
        assert r.returncode == 0, r.stderr
        assert '| on-demand $1.2/chip-hour: 41.7 chip-hours' in r.stdout
        assert '| spot      $0.4692/chip-hour: 106.6 chip-hours' in r.stdout
    assert on_demand.stdout.count('<- this plan') == spot.stdout.count('<- this plan') == 1
    assert 'on-demand $1.2/chip-hour: 41.7 chip-hours' in on_demand.stdout.split('<- this plan')[0].splitlines()[-1]
    assert 'spot      $0.4692' in spot.stdout.split('<- this plan')[0].splitlines()[-1]
    command = spot.stdout.strip().splitlines()[-1].split()
    assert '--spot=true' in command and '--spot=true' not in on_demand.stdout.strip().splitlines()[-1]
    c = tt.validate(tt.make_config(tt.parse_flags(command[2:])))
    expected = tt.make_plan(tt.validate(tt.make_config({'budget': 50.0, 'hardware': 'v5e', 'spot': True}, 'tpu')),
                            tt.chip_named('v5e'))
    assert expected['price'] == 0.4692 and expected['chip_hours'] == pytest.approx(50 / 0.4692)
    assert c.spot and c.steps == expected['steps'] and tt.matmul_params(c) == expected['params']
    cheaper = tt.make_plan(tt.validate(tt.make_config({'budget': 50.0, 'hardware': 'v5e'}, 'tpu')), tt.chip_named('v5e'))
    assert expected['params'] > cheaper['params']


@pytest.mark.parametrize('args, message', [
    (['--budget=0.001', '--hardware=v6e'], '--budget=0.001: too small'),
    (['--budget=10', '--hardware=tpu9'], '--hardware=tpu9: unknown chip'),
    (['--budget=10'], 'is not in the hardware table'),
    (['--budget=10', '--hardware=h100-pcie'], 'pass --price_per_hour'),
    (['--budget=10', '--hardware=h100', '--spot=true'], 'no spot list price for h100; pass --price_per_hour'),
    (['--budget=5', '--hardware=v6e', '--chips=1000000'], '--chips=1000000 is more than the 64 sequences of a step'),
])
def test_plan_errors_are_one_line(args, message, capsys):
    r = run_main(capsys, 'plan', *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
