"""trainers/trainer.py: exact resume, hot-swapped hyperparameters, learning, failures."""
from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from trainers.data import DataConfig, load_corpus
from trainers.model import InternLM2Config
from trainers.trainer import HPARAMS, FusedAdamW, NonFiniteLossError, Trainer, TrainConfig, lr_at


def _train_cfg(**kw) -> TrainConfig:
    # one torch thread: on a shared 2-core machine two spinning OpenMP threads can be 4x slower
    base = dict(batch_size=4, lr=3e-3, warmup_steps=5, decay_steps=40, seed=1, num_threads=1)
    return TrainConfig(**{**base, **kw})


def _snapshot(tr: Trainer) -> dict:
    """Deep copy of the weights and optimizer state, to compare states exactly."""
    return pickle.loads(pickle.dumps(tr.state_dict()))


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, error", [
    ({"lr": 0.0}, "greater_than"),
    ({"lr": float("nan")}, "finite_number"),
    ({"batch_size": 0}, "greater_than_equal"),
    ({"batch_size": 8.0}, "int_type"),
    ({"beta2": 1.0}, "less_than"),
    ({"weight_decay": -0.1}, "greater_than_equal"),
    ({"weight_decay": True}, "float_type"),                    # YAML's `yes` is no number
    ({"min_lr_ratio": 1.5}, "less_than_equal"),
    ({"schedule": "linear"}, "literal_error"),
    ({"decay_steps": 0}, "greater_than_equal"),
    ({"device": "tpu"}, "literal_error"),
    ({"compile": "yes"}, "bool_type"),
    ({"num_threads": 0}, "greater_than_equal"),
    ({"lrr": 1e-3}, "unexpected_keyword_argument"),
])
def test_bad_train_config_names_the_field(kwargs, error):
    # pydantic's ValidationError locates the field (experiments/config.py makes it one line)
    with pytest.raises(ValidationError) as e:                 # a ValueError: the CLI exits 2 on it
        TrainConfig(**kwargs)
    first = e.value.errors()[0]
    assert (first["loc"], first["type"]) == ((next(iter(kwargs)),), error) and isinstance(e.value, ValueError)


def test_train_config_stays_a_dataclass():
    cfg = TrainConfig(weight_decay=0)                          # an int for a float field
    assert cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)
    assert replace(cfg, lr=2e-3).lr == 2e-3 and pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(ValidationError):
        replace(cfg, lr=-1.0)                                  # set_hparams relies on this


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)              # half way down the cosine
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 500) == pytest.approx(0.1)
    assert lr_at(replace(cfg, schedule="constant"), 60) == 1.0
    assert lr_at(replace(cfg, decay_steps=None), 60) == 1.0
    assert lr_at(replace(cfg, warmup_steps=0), 0) == 1.0


# ----------------------------------------------------------------------------- exact resume

def test_fused_adamw_steps_equal_torch_fused_adamw_bit_for_bit():
    """FusedAdamW's lean step against torch.optim.AdamW(fused=True): two groups (decay / none), a
    parameter without a gradient on some steps, lr and betas changed between steps; the weights,
    the moments and the state_dicts must be identical, and a state_dict loads across the two."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 4, 2), (7,)]
    base = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]

    def run(make):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = make([{"params": params[:3:2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}])
        for i, step_grads in enumerate(grads):
            for j, (p, gr) in enumerate(zip(params, step_grads)):
                p.grad = None if (i == 2 and j == 3) else gr.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (i + 1)
                group["betas"] = (0.9, 0.95) if i < 3 else (0.8, 0.99)
            opt.step()
        return params, opt

    ours, ours_opt = run(lambda groups: FusedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8))
    ref, ref_opt = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert not torch.equal(ours[0], base[0])
    mine, theirs = ours_opt.state_dict(), ref_opt.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys() == {0, 1, 2, 3}
    for index, state in theirs["state"].items():
        assert state.keys() == mine["state"][index].keys()
        for key, value in state.items():
            assert value.dtype == mine["state"][index][key].dtype and torch.equal(value, mine["state"][index][key])
    assert float(mine["state"][3]["step"]) == 4.0 and float(mine["state"][0]["step"]) == 5.0
    # interchangeable: one more step from the same (copied: loading keeps the tensors) state is the same update
    ours_opt.load_state_dict(copy.deepcopy(theirs))
    ref_opt.load_state_dict(copy.deepcopy(theirs))
    for p, q in zip(ours, ref):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    ours_opt.step()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_a_fresh_process_trains_without_importing_dynamo(tmp_path):
    """torch wraps Optimizer.add_param_group / zero_grad / state_dict / load_state_dict so that
    their first call imports torch._dynamo (~2 s of CPU in every member's process); FusedAdamW
    calls them unwrapped: a trainer built, trained, evaluated and restored in a fresh process
    never imports it."""
    code = (
        "import sys\n"
        "from trainers.data import DataConfig\n"
        "from trainers.model import InternLM2Config\n"
        "from trainers.trainer import Trainer, TrainConfig\n"
        "data = DataConfig(max_bytes=200_000, val_fraction=0.2, seq_len=32, eval_batches=1, eval_batch_size=4, "
        f"cache_dir={str(tmp_path)!r})\n"
        "model = InternLM2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
        "num_attention_heads=4, num_key_value_heads=2)\n"
        "t = Trainer(model, TrainConfig(batch_size=2, warmup_steps=1), data)\n"
        "t.train(2); t.evaluate(); t.load_state_dict(t.state_dict()); t.train(1)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo', t.step)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["no", "dynamo", "3"]


def test_checkpoint_round_trip_is_bit_exact(tmp_path, small_data, tiny_model):
    whole = Trainer(tiny_model, _train_cfg(), small_data)
    expected = [whole.train(1)["last_loss"] for _ in range(40)]

    first = Trainer(tiny_model, _train_cfg(), small_data)
    losses = first.train(20)["losses"]
    path = tmp_path / "ckpt.pt"
    torch.save(first.state_dict(), path)
    state = torch.load(path, weights_only=True)               # plain dicts, lists, tensors, numbers

    # a fresh trainer with another architecture and other hyperparameters: all restored from the state
    other_arch = replace(tiny_model, num_hidden_layers=3, intermediate_size=96)
    resumed = Trainer(other_arch, _train_cfg(lr=1e-4, batch_size=2), small_data)
    resumed.load_state_dict(state)
    assert resumed.model_config == tiny_model and resumed.step == 20
    assert resumed.train_config == _train_cfg()
    losses += [resumed.train(1)["last_loss"] for _ in range(20)]

    assert losses == expected                                 # exactly, step by step
    _assert_states_equal(resumed.state_dict(), whole.state_dict())
    assert resumed.evaluate() == whole.evaluate()


def test_loading_into_a_trained_trainer_copies_in_place_and_resumes_bit_exact(small_data, tiny_model):
    """A trainer that already has moments of the same layout takes a state by copying it into
    its own tensors (the exploit fast path: no new model or optimizer); it then continues
    exactly as the state's own trainer does. Round trips through other architectures reuse the
    model left behind (a spare) just as exactly."""
    whole = Trainer(tiny_model, _train_cfg(), small_data)
    expected = [whole.train(1)["last_loss"] for _ in range(12)]
    first = Trainer(tiny_model, _train_cfg(), small_data)
    first.train(6)
    state = first.state_dict()

    other = Trainer(tiny_model, _train_cfg(lr=1e-4, batch_size=2), small_data)   # same seed: same batches
    other.train(3)
    model, optimizer = other.model, other._optimizer
    pointers = [p.data_ptr() for p in model.parameters()]
    other.load_state_dict(state)
    assert other.model is model and other._optimizer is optimizer
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert other.train(6)["losses"] == expected[6:]
    _assert_states_equal(other.state_dict(), whole.state_dict())

    deep = Trainer(replace(tiny_model, num_hidden_layers=3), _train_cfg(), small_data)
    deep.train(2)
    other.load_state_dict(deep.state_dict())                  # rebuilt: a new model
    assert other.model is not model and other.model_config.num_hidden_layers == 3
    other.load_state_dict(state)                              # back: the spare, in place
    assert other.model is model
    assert other.train(6)["losses"] == expected[6:]


def test_state_dict_is_a_copy(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    tr.train(2)
    state = tr.state_dict()
    before = _snapshot(tr)
    tr.train(2)
    _assert_states_equal(state, before)                       # training did not write into it
    assert state["model_config"] == tiny_model.to_dict() and state["train_config"]["lr"] == 3e-3


# ----------------------------------------------------------------------------- hot-swapped hyperparameters

def test_set_hparams_takes_effect_next_step_and_keeps_moments(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    tr.train(8)
    opt = tr._optimizer
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    tr.set_hparams(lr=1e-2, weight_decay=0.0, beta1=0.8, eps=1e-6, min_lr_ratio=0.5)
    for p, s in opt.state.items():                           # Adam moments untouched by the call
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    new_cfg = _train_cfg(lr=1e-2, weight_decay=0.0, beta1=0.8, eps=1e-6, min_lr_ratio=0.5)
    assert tr.train_config == new_cfg
    decay, no_decay = opt.param_groups
    assert decay["lr"] == lr_at(new_cfg, 8) and decay["betas"] == (0.8, 0.95) and decay["eps"] == 1e-6
    assert decay["weight_decay"] == 0.0 and no_decay["weight_decay"] == 0.0
    tr.train(1)
    assert tr._optimizer is opt and opt.param_groups[0]["lr"] == lr_at(new_cfg, 8)


def test_weight_update_scales_with_lr(small_data, tiny_model):
    """Same state, lr x10 -> the first update is exactly 10 times larger (Adam's direction and
    the decoupled decay term are both proportional to lr)."""
    cfg = _train_cfg(schedule="constant", warmup_steps=0)
    a = Trainer(tiny_model, cfg, small_data)
    a.train(5)
    b = Trainer(tiny_model, cfg, small_data)
    b.load_state_dict(a.state_dict())
    b.set_hparams(lr=cfg.lr * 10)
    w0 = a.state_dict()["model"]
    a.train(1)
    b.train(1)
    for name in ("model.layers.0.attention.wqkv.weight", "output.weight", "model.norm.weight"):
        da = a.state_dict()["model"][name] - w0[name]
        db = b.state_dict()["model"][name] - w0[name]
        assert (db.norm() / da.norm()).item() == pytest.approx(10.0, rel=1e-3), name


def test_set_hparams_rejects_unknown_or_bad_values(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    with pytest.raises(ValueError, match=r"^train.seed: not a hyperparameter that can change during training"):
        tr.set_hparams(seed=3)
    with pytest.raises(ValidationError) as e:               # a ValueError locating train.lr
        tr.set_hparams(lr=-1)
    assert e.value.errors()[0]["loc"] == ("lr",)
    assert tr.train_config == _train_cfg()                   # nothing applied
    assert set(HPARAMS) < {f for f in TrainConfig.__dataclass_fields__}


def test_batch_size_change_and_pure_batches(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    tr.train(3)
    tr.set_hparams(batch_size=7)
    corpus = load_corpus(small_data)
    x, y = corpus.batch(1, 3, 7)                              # (seed, step, batch_size) of the next step
    with torch.no_grad():
        expected = F.cross_entropy(tr.model(x).flatten(0, 1), y.flatten()).item()
    m = tr.train(1)
    assert m["tokens"] == 7 * small_data.seq_len and m["step"] == 4
    assert m["last_loss"] == pytest.approx(expected, rel=1e-6)
    # the batch stream does not depend on the history: a trainer that trained with batch 7 from
    # the start sees the same batch at step 3
    other = Trainer(tiny_model, _train_cfg(batch_size=7), small_data)
    other.train(3)
    assert torch.equal(corpus.batch(1, 3, 7)[0], x)


# ----------------------------------------------------------------------------- failures

def test_inf_weight_raises_before_the_step(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    tr.train(3)
    with torch.no_grad():
        tr.model.output.weight[0, 0] = float("inf")
    before = _snapshot(tr)
    with pytest.raises(NonFiniteLossError) as e:
        tr.train(5)
    assert e.value.step == 3 and not math.isfinite(e.value.loss)
    assert "non-finite loss at step 3" in str(e.value)
    _assert_states_equal(tr.state_dict(), before)             # weights and Adam state unchanged
    again = pickle.loads(pickle.dumps(e.value))               # crosses process boundaries intact
    assert (again.step, str(again)) == (3, str(e.value))


def test_huge_lr_raises_and_leaves_last_finite_state(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(warmup_steps=0, grad_clip=0.0), small_data)
    tr.train(2)
    tr.set_hparams(lr=1e30)
    for _ in range(10):
        before = _snapshot(tr)
        try:
            tr.train(1)
        except NonFiniteLossError as e:
            assert e.step == before["step"] == tr.step
            _assert_states_equal(tr.state_dict(), before)
            break
    else:
        pytest.fail("lr=1e30 never produced a non-finite loss")


# ----------------------------------------------------------------------------- setup

def test_vocab_comes_from_the_corpus_and_threads_from_the_env(small_data, tiny_model, monkeypatch):
    monkeypatch.setenv("EVO_NUM_THREADS", "1")
    tr = Trainer(replace(tiny_model, vocab_size=1000), _train_cfg(num_threads=None), small_data)
    assert tr.model_config.vocab_size == 256
    assert tr.model.output.weight.shape == (256, tiny_model.hidden_size)
    assert torch.get_num_threads() == 1
    Trainer(tiny_model, _train_cfg(num_threads=2), small_data)
    assert torch.get_num_threads() == 2                       # the config wins over the env
    monkeypatch.setenv("EVO_NUM_THREADS", "half")
    with pytest.raises(ValueError, match="^EVO_NUM_THREADS: must be a positive integer, got 'half'$"):
        Trainer(tiny_model, _train_cfg(num_threads=None), small_data)


def test_metrics(small_data, tiny_model):
    tr = Trainer(tiny_model, _train_cfg(), small_data)
    m = tr.train(4)
    assert m["step"] == 4 == tr.step and len(m["losses"]) == 4
    assert m["train_loss"] == pytest.approx(np.mean(m["losses"])) and m["last_loss"] == m["losses"][-1]
    assert m["tokens"] == 4 * 4 * 32 and m["seconds"] > 0 and m["tokens_per_s"] > 0
    assert m["grad_norm"] > 0
    ev = tr.evaluate()
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / math.log(2))   # bytes: 1 byte per token
    assert tr.model.training                                  # evaluate() puts the model back in train mode
    assert tr.num_parameters() == sum(p.numel() for p in tr.model.parameters())


# ----------------------------------------------------------------------------- it learns

def test_learns_far_below_unigram_entropy():
    """300 steps of the default tiny model on the default corpus (the standard library)."""
    data = DataConfig()                                       # stdlib, bytes, seq 128
    tr = Trainer(InternLM2Config(), TrainConfig(batch_size=16, lr=3e-3, warmup_steps=20, decay_steps=300,
                                                  num_threads=1), data)
    corpus = tr.corpus
    # cross-entropy of the validation bytes under the training unigram distribution (add-one)
    counts = np.bincount(np.asarray(corpus.train_tokens), minlength=corpus.vocab_size) + 1.0
    log2p = np.log2(counts / counts.sum())
    val = np.bincount(np.asarray(corpus.val_tokens), minlength=corpus.vocab_size)
    unigram_bpb = -(val * log2p).sum() / val.sum() / corpus.bytes_per_token
    start = tr.evaluate()["val_bpb"]
    tr.train(300)
    end = tr.evaluate()["val_bpb"]
    print(f"\nunigram entropy {unigram_bpb:.3f} bits/byte; model val_bpb {start:.3f} at step 0 -> "
          f"{end:.3f} at step 300 (ratio {end / unigram_bpb:.3f})")
    assert 4.0 < unigram_bpb < 5.5
    assert end < 0.75 * unigram_bpb


# ----------------------------------------------------------------------------- data mix

@pytest.fixture
def two_sources(tmp_path) -> DataConfig:
    """Python source (stdlib) and the documentation's English prose (stdlib-docs)."""
    return DataConfig(sources={"code": "stdlib", "docs": "stdlib-docs"}, max_bytes=200_000, seq_len=32,
                      val_fraction=0.2, eval_batches=1, eval_batch_size=4)


def test_mix_change_is_in_place_and_seen_from_the_next_step(two_sources, tiny_model, tmp_path):
    tr = Trainer(tiny_model, _train_cfg(), two_sources)
    corpus = tr.corpus
    # the batches' sources with the seed fixed: equal weights, then all docs from step 3 on
    before = [corpus.sources_for(1, s, 4, tr.mix).tolist() for s in range(3)]
    assert before == [corpus.sources_for(1, s, 4).tolist() for s in range(3)]
    assert any(0 in b for b in before) and any(1 in b for b in before)
    tr.train(3)
    opt, model = tr._optimizer, tr.model
    tr.set_mix(code=0.0)
    assert tr.mix == {"code": 0.0, "docs": 1.0}
    assert all(corpus.sources_for(1, s, 4, tr.mix).tolist() == [1, 1, 1, 1] for s in range(3, 8))
    x, _ = tr._batch(1, 3, 4)
    assert torch.equal(x, corpus.batch(1, 3, 4, {"code": 0.0})[0])
    tr.train(2)
    assert tr._optimizer is opt and tr.model is model          # no rebuild, moments kept
    m = tr.evaluate()
    assert set(m) == {"val_loss", "val_bpb", "val_bpb.code", "val_bpb.docs"}
    assert m["val_bpb"] == pytest.approx((m["val_bpb.code"] + m["val_bpb.docs"]) / 2)
    with pytest.raises(ValueError, match="data.mix.prose: no such source"):
        tr.set_mix(prose=1.0)
    with pytest.raises(ValueError, match="not all zero"):
        tr.set_mix(docs=0.0)


def test_mix_is_in_the_checkpoint_and_resume_is_bit_exact(two_sources, tiny_model, tmp_path):
    whole = Trainer(tiny_model, _train_cfg(), two_sources)
    whole.train(2)
    whole.set_mix(code=0.25)
    expected = whole.train(4)["losses"]

    first = Trainer(tiny_model, _train_cfg(), two_sources)
    first.train(2)
    first.set_mix(code=0.25)
    first.train(1)
    torch.save(first.state_dict(), tmp_path / "c.pt")
    resumed = Trainer(tiny_model, _train_cfg(), two_sources)
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert resumed.mix == {"code": 0.25, "docs": 1.0}
    assert [expected[0]] + resumed.train(3)["losses"] == expected
    assert resumed.evaluate() == whole.evaluate()


# ----------------------------------------------------------------------------- fitness

def test_fitness_sets_judge_on_a_text_never_trained_on(tiny_model, tmp_path):
    """fitness.eval: a text never trained on (stdlib-docs beside a code corpus) and the training
    corpus's own validation split; val_bpb is their weighted mean, and training is untouched."""
    from trainers.fitness import EvalSet, FitnessConfig

    data = DataConfig(corpus="stdlib", max_bytes=200_000, seq_len=32, val_fraction=0.2,
                      eval_batches=1, eval_batch_size=4)
    fitness = FitnessConfig(eval={"docs": EvalSet(corpus="stdlib-docs", weight=3.0),
                                  "code": EvalSet(source="stdlib")})
    judged, plain = Trainer(tiny_model, _train_cfg(), data, fitness), Trainer(tiny_model, _train_cfg(), data)
    assert judged.train(3)["losses"] == plain.train(3)["losses"]       # the docs are never trained on
    ev, ev_plain = judged.evaluate(), plain.evaluate()
    assert set(ev) == {"val_loss", "val_bpb", "val_bpb.docs", "val_bpb.code"}
    assert set(ev_plain) == {"val_loss", "val_bpb"}
    assert ev["val_bpb.code"] == ev_plain["val_bpb"]
    assert ev["val_bpb"] == pytest.approx((3 * ev["val_bpb.docs"] + ev["val_bpb.code"]) / 4)
    # the held-out docs: pydoc_data topics up to data.max_bytes, all of them held out
    held = judged._held_out["docs"]
    assert held.meta["val_documents"] > 10 and held.meta["train_tokens"] == 0
    # a fitness section that names nothing is no fitness section
    assert Trainer(tiny_model, _train_cfg(), data, FitnessConfig()).evaluate() == \
        Trainer(tiny_model, _train_cfg(), data).evaluate()
    with pytest.raises(ValidationError, match="either source or corpus"):
        EvalSet(source="a", corpus="b")


def test_fitness_held_out_text_uses_the_training_bpe_tokenizer(tiny_model, two_sources):
    """With bpe, a held-out text is tokenized by the tokenizer trained on the training sources
    (and not trained on it: the training cache entry is the one without the section)."""
    from tokenizers import Tokenizer

    from trainers.fitness import EvalSet, FitnessConfig

    data = replace(two_sources, sources={"code": "stdlib"}, tokenizer="bpe", vocab_size=300)
    fitness = FitnessConfig(eval={"docs": EvalSet(corpus="stdlib-docs"), "code": EvalSet(source="code")})
    tr = Trainer(replace(tiny_model, vocab_size=300), _train_cfg(), data, fitness)
    assert tr.corpus.path == load_corpus(data).path
    held = tr._held_out["docs"]
    tok = Tokenizer.from_file(tr.corpus.tokenizer_path)
    first = held.val_tokens[:50].tolist()
    from pydoc_data.topics import topics
    text = next(t for _, t in sorted(topics.items()) if t)
    assert tok.encode(text).ids[:50] == first
    ev = tr.evaluate()
    assert ev["val_bpb"] == pytest.approx((ev["val_bpb.docs"] + ev["val_bpb.code"]) / 2)


def _nan_metric(model, batches, device):
    return float("nan")


def _raising_metric(model, batches, device):
    raise RuntimeError("no GPU here\nsecond line")


def test_fitness_function_gets_the_model_batches_and_device(tiny_model, small_data):
    """Trainer.score: the function's value, or nan with one line naming it; the model is back in
    train mode either way. The worked example (exact_match) scores a fraction of its 64 pairs."""
    from experiments.examples.exact_match import exact_match, pairs
    from trainers.fitness import FitnessFunctionError, load_function

    tr = Trainer(tiny_model, _train_cfg(), small_data)
    seen = {}

    def metric(model, batches, device):
        seen.update(training=model.training, grad=torch.is_grad_enabled(), names=list(batches), device=device,
                    n=len(batches["stdlib"]))
        return 7

    assert tr.score(metric, "t:metric") == (7.0, None)
    assert seen == {"training": False, "grad": False, "names": ["stdlib"], "device": tr.device,
                    "n": small_data.eval_batches}
    assert tr.model.training
    score, error = tr.score(_nan_metric, "t:nan")
    assert math.isnan(score) and error == "fitness.function t:nan returned a non-finite value (nan)"
    score, error = tr.score(_raising_metric, "t:raise")
    assert math.isnan(score) and error == "fitness.function t:raise failed: RuntimeError: no GPU here"
    fn = load_function("experiments.examples.exact_match:exact_match")
    assert fn is exact_match and len(pairs()) == 64
    score, error = tr.score(fn, "exact_match")
    assert error is None and score * 64 == int(score * 64) and 0 <= score <= 1
    with pytest.raises(FitnessFunctionError, match=r"cannot be called as _snapshot\(model, batches, device\)"):
        load_function("tests.trainers.test_trainer:_snapshot")   # takes one argument
