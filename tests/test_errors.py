"""Signals (imgclf.errors): raised at once outside training, only recorded inside it and raised at the next
batch boundary from our own code, and a second signal always raised at once."""

from __future__ import annotations

import contextlib
import signal

import pytest

from imgclf import errors
from imgclf.training.callbacks import StopOnSignal
from imgclf.errors import Interrupted, deferred_interrupts, on_interrupt_signal, raise_if_interrupted


@pytest.fixture(autouse=True)
def no_signal_left():
    yield
    errors._signals.clear()


def test_outside_training_a_signal_raises_at_once():
    with pytest.raises(Interrupted):
        on_interrupt_signal(signal.SIGTERM, None)
    assert errors._signals == [signal.SIGTERM]


@contextlib.contextmanager
def not_raised(what: str):
    """Fail the test when `what` raises Interrupted. An outer pytest.raises(Interrupted) would take an immediate
    raise for the deferred one, and a KeyboardInterrupt escaping a test would stop the whole session."""
    try:
        yield
    except Interrupted:
        pytest.fail(f"{what} raised Interrupted at once instead of deferring it")


def test_inside_training_a_signal_is_recorded_then_raised_at_the_next_batch_end():
    with pytest.raises(Interrupted):  # leaving the training block with the signal still recorded raises it again
        with deferred_interrupts():
            with not_raised("a first signal inside training"):
                on_interrupt_signal(signal.SIGTERM, None)  # lands anywhere (TensorFlow, MLflow): nothing raised
                StopOnSignal().on_epoch_begin(0)  # a callback that does not check
            assert errors._signals == [signal.SIGTERM]
            with pytest.raises(Interrupted):
                StopOnSignal().on_train_batch_end(0, {"loss": 1.0})


def test_a_signal_recorded_at_the_very_end_of_training_raises_when_it_ends():
    with pytest.raises(Interrupted):
        with deferred_interrupts():
            with not_raised("a signal at the end of training"):
                on_interrupt_signal(signal.SIGINT, None)
    assert errors._deferring == [False]


def test_a_second_signal_raises_at_once_even_inside_training():
    with deferred_interrupts():
        with not_raised("a first signal inside training"):
            on_interrupt_signal(signal.SIGINT, None)
        with pytest.raises(Interrupted):
            on_interrupt_signal(signal.SIGINT, None)
        errors._signals.clear()


def test_a_swallowed_interrupt_is_raised_again_at_the_next_safe_point():
    try:
        on_interrupt_signal(signal.SIGTERM, None)
    except Interrupted:
        pass  # what a finalizer or a broad `except` in a library would do
    with pytest.raises(Interrupted):
        StopOnSignal().on_train_batch_end(0, {"loss": 1.0})
    errors._signals.clear()
    StopOnSignal().on_train_batch_end(0, {"loss": 1.0})  # no signal: nothing raised
    raise_if_interrupted()


def test_interrupted_is_a_keyboard_interrupt_and_errors_are_one_line():
    assert issubclass(Interrupted, KeyboardInterrupt) and issubclass(errors.DataError, errors.ImgclfError)
    assert errors.one_line(ValueError("a\n  b\tc")) == "a b c" and errors.one_line(ValueError()) == "ValueError"
