"""Export to the Hugging Face format, checked against `transformers` itself (a test-only
dependency): the exported model gives tinytpu's logits and greedy tokens; the tokenizer files give
tiktoken's tokens; what has no standard architecture is refused in one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prepare
import tinytpu as tt
from conftest import SHAKESPEARE, forward, needs_gpt2, save_checkpoint, write_shard

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXT = open(SHAKESPEARE, encoding='utf-8').read()


@pytest.fixture(scope='module')
def gpt2_data(tmp_path_factory):
    """Shakespeare's first 40K GPT-2 tokens (train) and the next 4K (val)."""
    enc = prepare.get_encoding('gpt2')
    tokens = [enc.eot_token] + enc.encode_ordinary(TEXT[:200_000])
    d = tmp_path_factory.mktemp('gpt2_data')
    write_shard(d / 'train_000000.bin', tokens[:40_000])
    write_shard(d / 'val_000000.bin', tokens[40_000:44_000])
    (d / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256}))
    return str(d)


def train(data, out, *flags):
    """A small SwiGLU model trained for 30 steps (in this process: no second JAX start-up)."""
    assert tt.main([f'--data={data}', f'--out={out}', '--mlp=swiglu', '--n_layer=2', '--d_model=64', '--n_head=4',
                    '--context=32', '--seq_len=32', '--batch_size=8', '--steps=30', '--warmup_steps=5',
                    '--log_every=10', '--eval_every=30', '--eval_batches=2', *flags]) == 0
    return out


def export(out, export_dir, *flags):
    assert tt.main(['export', f'--out={out}', f'--export_dir={export_dir}', *flags]) == 0
    return str(export_dir)


@pytest.mark.slow
@pytest.mark.parametrize('flags', [('--n_kv_head=2', '--tie_embed=true', '--rope_theta=500'),
                                   ('--n_kv_head=1', '--tie_embed=false', '--d_head=32', '--d_ff=96'),
                                   ('--mlp=relu2',)],
                         ids=['gqa-tied', 'mqa-untied', 'relu2'])
def test_transformers_gives_tinytpus_logits_and_greedy_tokens(byte_data, tmp_path, flags):
    out = train(byte_data, str(tmp_path / 'run'), *flags)
    (tmp_path / '.tmp_export_999999999').mkdir()  # what an export killed mid-write left (no such process)
    (tmp_path / '.tmp_export_999999999' / 'model.safetensors').write_bytes(b'partial')
    hf_dir = export(out, tmp_path / 'hf', '--export_dtype=float32')
    assert not (tmp_path / '.tmp_export_999999999').exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # no custom code
    assert type(model).__name__ == 'Qwen3ForCausalLM' and model.dtype == torch.float32

    c = tt.validate(tt.make_config({'out': out}))
    c, params, meta, enc = tt.load_model(c, set())
    tokens = np.array([list(TEXT[i:i + 32].encode()) for i in (0, 5000, 9000)])
    ours = np.asarray(forward(params, jnp.asarray(tokens), c))[..., :c.vocab_size]
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert theirs.shape == ours.shape == (3, 32, 257)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    prompt = list(b'ROMEO:\n')
    greedy = list(tt.generate(params, prompt, tt.dataclasses.replace(c, temperature=0.0, max_new_tokens=20)))
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert generated[0, len(prompt):].tolist() == greedy and len(greedy) == 20

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)  # the byte tokenizer, spelled out
    assert tok(TEXT[:500])['input_ids'] == list(TEXT[:500].encode())
    assert tok.decode(greedy) == bytes(greedy).decode('utf-8', errors='replace')
    assert 'token i < 256 is byte i' in open(os.path.join(hf_dir, 'README.md')).read()


@needs_gpt2
def test_a_gpt2_model_exports_in_bfloat16_with_its_tokenizer(gpt2_data, tmp_path):
    out = train(gpt2_data, str(tmp_path / 'run'), '--n_kv_head=2', '--steps=10', '--eval_every=10')  # 50,304 logits: 0.3 s a step
    hf_dir = export(out, tmp_path / 'hf')  # the default: bfloat16
    config = json.load(open(os.path.join(hf_dir, 'config.json')))
    assert config['vocab_size'] == 50257 and config['torch_dtype'] == 'bfloat16' and config['eos_token_id'] == 50256
    assert json.load(open(os.path.join(hf_dir, 'generation_config.json')))['eos_token_id'] == 50256
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (50257, 64)  # the padded rows dropped

    c = tt.validate(tt.make_config({'out': out}))
    c, params, meta, enc = tt.load_model(c, set())
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)  # what bf16 keeps
    tokens = np.array([enc.encode_ordinary(TEXT[50_000:50_400])[:32]])
    ours = np.asarray(forward(rounded, jnp.asarray(tokens), c))[..., :50257]
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


@needs_gpt2
def test_gpt2_tokenizer_files_tokenize_as_tiktoken(tmp_path):
    enc = prepare.get_encoding('gpt2')
    tt.write_tokenizer(str(tmp_path), enc, enc.eot_token, 1024)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    samples = [TEXT[:20_000], "Héllo wörld — naïve café 🤖 123,456.78 don't  \n\n  trailing   ", '\t\x00 €\u200b']
    for text in samples:
        ids = tok(text)['input_ids']
        assert ids == enc.encode_ordinary(text)
        assert tok.decode(ids) == text
    assert tok('a<|endoftext|>b')['input_ids'] == enc.encode('a<|endoftext|>b', allowed_special='all')
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def untrained(out, **settings):
    """A checkpoint of a freshly initialized model (step 0) in out, written as training writes one."""
    os.makedirs(out)
    c = tt.validate(tt.Config(**{'out': out, 'mlp': 'swiglu', 'n_layer': 1, 'd_model': 32, **settings}))
    save_checkpoint(out, tt.fresh_state(c), c, {'tokenizer': 'byte', 'eot_id': 256})
    return out


@pytest.mark.slow
def test_what_does_not_map_is_refused_in_one_line(tmp_path, capsys):
    def refused(*flags):
        assert tt.main(['export', *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        return err

    capped = untrained(str(tmp_path / 'capped'), logit_softcap=30.0)
    assert '--logit_softcap=30' in refused(f'--out={capped}', f'--export_dir={tmp_path}/b')
    (tmp_path / 'taken').mkdir()
    assert 'already exists' in refused(f'--out={untrained(str(tmp_path / "fine"))}', f'--export_dir={tmp_path}/taken')
    assert '--export_dir' in refused(f'--out={capped}')
    assert '--export_dtype=int8' in refused(f'--out={capped}', f'--export_dir={tmp_path}/c', '--export_dtype=int8')
    assert sorted(os.listdir(tmp_path)) == ['capped', 'fine', 'taken']  # nothing half-written left
    assert tt.main(['export', f'--out={tmp_path}/fine', f'--export_dir={tmp_path}/d']) == 0
    assert sorted(os.listdir(tmp_path / 'd')) == ['README.md', 'config.json', 'generation_config.json',
                                                 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']


def test_every_preset_exports():
    """Every preset trains what Qwen3ForCausalLM computes (no soft-cap; the cpu preset's ReLU^2 as
    the gated MLP it equals); gpt2 keeps the parameter count it had with GPT-2's MLP. A soft-cap is
    refused in one line."""
    for preset in tt.PRESETS:
        assert tt.export_problem(tt.make_config({'preset': preset}, 'cpu')) is None, preset
    gpt2 = tt.make_config({'preset': 'gpt2'}, 'cpu')
    assert tt.param_count(gpt2) == 123_568_128 and tt.ff_dim(gpt2) * 3 == 768 * 4 * 2
    assert tt.export_problem(tt.make_config({'logit_softcap': 30.0}, 'cpu')).startswith('--logit_softcap=30')
