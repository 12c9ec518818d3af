"""BehaviorConfig / BehaviorModel: shapes, causality, padding, persistence, and real learning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel

from core.model import BehaviorConfig, BehaviorModel, BehaviorOutput
from core.sequences import SequenceFeaturizer, iter_window_batches, make_windows

VOCAB = {"event_type": 12, "category": 7, "gap": 10, "new_device": 5}
N_FIELDS = len(VOCAB)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: one thread is ~10x faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs) -> BehaviorModel:
    torch.manual_seed(0)
    config = BehaviorConfig.from_size("tiny", VOCAB, max_len=32, dropout=0.0, **kwargs)
    return BehaviorModel(config).eval()


def random_fields(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(1, v, (batch, length, 1), generator=g) for v in VOCAB.values()]
    return torch.cat(cols, dim=-1)  # indices 1.. : absent, unknown and real values


def test_shapes_and_zeros_at_padding_and_absent_fields() -> None:
    model = tiny()
    fields = random_fields(3, 20)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    fields[1, 12:] = 0
    fields[0, 5, 1] = 1  # category absent at one event
    with torch.no_grad():
        out = model(fields, mask)
    assert isinstance(out, BehaviorOutput)
    assert out.surprisal.shape == (3, 20) and out.surprisal.dtype == torch.float32
    assert out.field_nll.shape == (3, 20, N_FIELDS)
    assert [t.shape for t in out.field_logits] == [(3, 20, v) for v in VOCAB.values()]
    assert out.sequence_logit.shape == (3,)
    assert out.hidden_states.shape == (3, 20, 32) and out.pooled.shape == (3, 64)
    assert (out.surprisal[1, 12:] == 0).all() and (out.surprisal[mask] > 0).all()
    assert out.field_nll[0, 5, 1] == 0 and out.field_nll[0, 5, 0] > 0
    expected = out.surprisal[mask].mean()
    torch.testing.assert_close(out.nll_loss, expected)
    assert out.loss is out.nll_loss

    labels = torch.tensor([0.0, 1.0, float("nan")])
    with torch.no_grad():
        labelled = model(fields, mask, labels=labels)
        unlabelled = model(fields, mask, labels=torch.full((3,), float("nan")))
    assert labelled.loss > labelled.nll_loss
    torch.testing.assert_close(unlabelled.loss, unlabelled.nll_loss)


def test_bad_inputs_are_clear_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="max_len"):
        model(random_fields(1, 33), torch.ones(1, 33, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[batch, length, 4\]"):
        model(random_fields(1, 5)[..., :2])
    # transformers validates configs with huggingface_hub's strict dataclasses
    with pytest.raises(StrictDataclassClassValidationError, match="vocab_sizes"):
        BehaviorConfig(field_names=["event_type", "price"], vocab_sizes={"event_type": 5})
    with pytest.raises(ValueError, match="unknown model size"):
        BehaviorConfig.from_size("huge", VOCAB)  # type: ignore[arg-type]


def test_changing_event_t_leaves_earlier_surprisal_unchanged() -> None:
    model = tiny()
    fields = random_fields(2, 24)
    changed = fields.clone()
    t = 10
    changed[:, t] = torch.tensor([5, 3, 7, 4])
    changed[:, t + 1 :] = random_fields(2, 24, seed=9)[:, t + 1 :]
    with torch.no_grad():
        a, b = model(fields), model(changed)
    torch.testing.assert_close(a.surprisal[:, :t], b.surprisal[:, :t], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.hidden_states[:, :t], b.hidden_states[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a.surprisal[:, t], b.surprisal[:, t])


def test_padding_does_not_change_real_positions() -> None:
    model = tiny()
    seq = random_fields(1, 9, seed=3)
    padded = torch.cat([seq, random_fields(1, 15, seed=4)], dim=1)  # garbage after the end
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[:, :9] = True
    with torch.no_grad():
        alone = model(seq, torch.ones(1, 9, dtype=torch.bool))
        with_pad = model(padded, mask)
        # batched with a longer sequence: the short one is right-padded with zeros
        batch = torch.zeros(2, 24, N_FIELDS, dtype=torch.long)
        batch[0] = random_fields(1, 24, seed=5)[0]
        batch[1, :9] = seq[0]
        batched = model(batch)  # mask inferred from the zero padding
    for out, row in ((with_pad, 0), (batched, 1)):
        torch.testing.assert_close(out.surprisal[row, :9], alone.surprisal[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pooled[row], alone.pooled[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out.sequence_logit[row], alone.sequence_logit[0], atol=1e-5, rtol=0
        )
        assert (out.surprisal[row, 9:] == 0).all()
    torch.testing.assert_close(with_pad.nll_loss, alone.nll_loss)


def test_a_masked_event_inside_a_sequence_is_invisible() -> None:
    # not right padding: the model must pass an explicit mask to attention
    model = tiny()
    fields = random_fields(1, 12, seed=6)
    other = fields.clone()
    other[0, 4] = torch.tensor([9, 2, 8, 4])
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 4] = False
    with torch.no_grad():
        a, b = model(fields, mask), model(other, mask)
        unmasked = model(other, torch.ones(1, 12, dtype=torch.bool))
    torch.testing.assert_close(a.surprisal, b.surprisal, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.sequence_logit, b.sequence_logit, atol=1e-6, rtol=0)
    assert a.surprisal[0, 4] == 0
    assert not torch.allclose(unmasked.surprisal[0, 5:], b.surprisal[0, 5:])


def test_save_load_round_trip_and_auto_classes(tmp_path) -> None:
    model = tiny(field_loss_weights={"gap": 0.5})
    fields = random_fields(2, 16, seed=7)
    with torch.no_grad():
        before = model(fields)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()

    loaded = BehaviorModel.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto, BehaviorModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BehaviorConfig)
    assert auto.config.field_names == list(VOCAB) and auto.config.field_loss_weights == {"gap": 0.5}
    for other in (loaded, auto):
        with torch.no_grad():
            after = other(fields)
        torch.testing.assert_close(after.surprisal, before.surprisal, rtol=0, atol=0)
        torch.testing.assert_close(after.sequence_logit, before.sequence_logit, rtol=0, atol=0)
        torch.testing.assert_close(after.field_nll, before.field_nll, rtol=0, atol=0)


def test_head_calibration_maps_the_logit_and_survives_a_round_trip(tmp_path) -> None:
    model = tiny()
    fields = random_fields(3, 16, seed=5)
    with torch.no_grad():
        raw = model(fields).sequence_logit
    model.config.head_logit_scale, model.config.head_logit_bias = 0.5, -2.0
    with torch.no_grad():
        calibrated = model(fields).sequence_logit
    torch.testing.assert_close(calibrated, 0.5 * raw - 2.0)
    model.save_pretrained(tmp_path)
    loaded = BehaviorModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.head_logit_scale, loaded.config.head_logit_bias) == (0.5, -2.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(fields).sequence_logit, calibrated)


def test_field_loss_weights_scale_surprisal() -> None:
    fields = random_fields(2, 12, seed=2)
    with torch.no_grad():
        plain = tiny()(fields)
        weighted = tiny(field_loss_weights={"gap": 0.0, "category": 2.0})(fields)
    torch.testing.assert_close(weighted.field_nll[..., 2], torch.zeros(2, 12))
    torch.testing.assert_close(weighted.field_nll[..., 1], 2 * plain.field_nll[..., 1])


def test_bf16_autocast_keeps_surprisal_float32_and_close() -> None:
    model = tiny()
    fields = random_fields(2, 16, seed=11)
    with torch.no_grad():
        full = model(fields)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(fields)
    assert half.surprisal.dtype == torch.float32 and half.sequence_logit.dtype == torch.float32
    torch.testing.assert_close(half.surprisal, full.surprisal, atol=0.1, rtol=0.05)


def pattern_batch(batch: int, length: int, seed: int) -> torch.Tensor:
    """Event types cycle 3,4,5,6 from a random phase; the gap field follows the type;
    category and new_device are random noise the model cannot learn."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.randint(0, 4, (batch, 1), generator=g)
    cycle = (phase + torch.arange(length)) % 4
    fields = torch.empty(batch, length, N_FIELDS, dtype=torch.long)
    fields[..., 0] = 3 + cycle
    fields[..., 1] = torch.randint(3, 7, (batch, length), generator=g)
    fields[..., 2] = 4 + cycle
    fields[..., 3] = torch.randint(3, 5, (batch, length), generator=g)
    return fields


def test_heads_learn_next_event_structure() -> None:
    torch.manual_seed(0)
    config = BehaviorConfig.from_size("tiny", VOCAB, max_len=32, dropout=0.0)
    model = BehaviorModel(config)
    held_out = pattern_batch(16, 24, seed=999)
    with torch.no_grad():
        nll_at_init = model.eval()(held_out).nll_loss.item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(100):
        loss = model(pattern_batch(16, 24, seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    with torch.no_grad():
        nll_trained = model(held_out).nll_loss.item()
        # the noise fields alone cost log(4) + log(2) ~ 2.08 nats per event; types are learnable
        assert nll_trained < 0.6 * nll_at_init and nll_trained < 3.0

        broken = held_out.clone()
        t = 15
        broken[:, t, 0] = 3 + (held_out[:, t, 0] - 3 + 2) % 4  # skip ahead in the cycle
        normal = model(held_out)
        odd = model(broken)
    jump = odd.field_nll[:, t, 0] - normal.field_nll[:, t, 0]
    assert (jump > 2.0).all()
    assert (odd.surprisal[:, t] > normal.surprisal[:, t] + 2.0).all()
    # the odd event stands out from everything before it (the one after it is odd too: the
    # model cannot know whether the cycle resumes from the odd event or from where it was)
    assert (odd.surprisal[:, t] > odd.surprisal[:, :t].max(dim=1).values).all()


def test_end_to_end_from_featurizer_windows() -> None:
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame(
        {
            "user_id": rng.choice(["a", "b", "c", "d"], n),
            "ts": np.datetime64("2024-01-01") + np.sort(rng.integers(0, 10**6, n)).astype("m8[s]"),
            "event_type": rng.choice(["E5", "E22", "E7"], n),
            "device_id": rng.choice(["x", "y"], n),
        }
    )
    featurizer = SequenceFeaturizer().fit(frame)
    enc = featurizer.transform(frame)
    windows = make_windows(enc, max_len=32)
    torch.manual_seed(0)
    model = BehaviorModel(BehaviorConfig.from_size("tiny", featurizer.vocab_sizes(), max_len=32))
    model.eval()
    seen = 0
    with torch.no_grad():
        for batch in iter_window_batches(windows, batch_size=8):
            out = model(torch.from_numpy(batch.fields), torch.from_numpy(batch.mask))
            assert torch.isfinite(out.surprisal).all()
            assert (out.surprisal[torch.from_numpy(batch.mask)] > 0).all()
            seen += int(batch.primary.sum())
    assert seen == n


def test_named_sizes_grow_and_the_cli_offers_each_of_them() -> None:
    from core.config import MODEL_SIZE_NAMES
    from core.model import MODEL_SIZES

    assert MODEL_SIZE_NAMES == tuple(MODEL_SIZES)
    counts = [
        sum(p.numel() for p in BehaviorModel(BehaviorConfig.from_size(name, VOCAB)).parameters())
        for name in ("tiny", "small", "medium")
    ]
    assert counts == sorted(counts) and len(set(counts)) == 3
