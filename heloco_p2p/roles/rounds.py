"""The training thread's rounds: H inner steps, the pseudo-gradient, its submission.

Blocking rounds wait for each submission's reply and start from the θ in it. Overlapped rounds
(``swarm.overlap``) train round k+1 while round k's submission travels: ``InFlight`` is the one
submission in flight and the only hand-off between the two threads. The sender hands over the θ
the submission ends with (the reply's, a downloaded state, or the last one known after a refusal);
the training thread folds it in at the next step boundary (``InnerTrainer.fold_in``); a round
that ends first waits for it, and that wait is idle time. Each Δ is measured from the last global
θ folded in, whose version is the round's base v0 (docs/protocol.md, "Overlapped rounds").
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised inside a round when the peer was asked to leave."""


class InFlight:
    """One submission in flight: the thread sending it and the θ it ends with.

    :param send: runs on the sender thread (the submission, and whatever its outcome calls)
    :param fallback: ``() -> (θ, version, schedule step)`` when ``send`` handed nothing over
        (refused, given up, failed): the last global θ known
    """

    def __init__(self, send: Callable[[], None], fallback: Callable[[], tuple]):
        self._ready = threading.Event()
        self._fold: tuple | None = None

        def run():
            try:
                send()
            except Exception:  # the next round must not wait forever for a reply that cannot come
                logger.exception("a submission failed")
            finally:
                if self._fold is None:
                    self._fold = fallback()
                self._ready.set()

        self.thread = threading.Thread(target=run, name="submit", daemon=True)

    def start(self) -> "InFlight":
        self.thread.start()
        return self

    def is_sender(self) -> bool:
        """Whether the calling thread is this submission's sender."""
        return threading.current_thread() is self.thread

    def hand(self, params: list[torch.Tensor], version: int, schedule_step: int) -> None:
        """(sender thread) the θ the training thread folds in next."""
        self._fold = (params, version, schedule_step)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def take(self) -> tuple:
        """(training thread, once ready) the θ, version and schedule step to fold in."""
        return self._fold


class RoundLoop:
    """Rounds until ``more()`` says stop, and what the heartbeat reports about them.

    :param trainer: the peer's ``InnerTrainer``
    :param steps_for: ``() -> H`` of the next round (DyLU)
    :param more: ``() -> bool``: another round (time, budgets, stop)
    :param submit: ``submit(Δ, base version, stats, compute seconds)``; adopts what it gets
    :param held: ``() -> (θ, version)``: the global θ the peer holds
    :param speed: (0, 1]: emulate slower hardware by idling (1/speed − 1) × step time
    """

    def __init__(self, trainer, steps_for: Callable[[], int], more: Callable[[], bool],
                 submit: Callable, held: Callable[[], tuple], log_metric: Callable[[dict], None],
                 stop_event: threading.Event, speed: float = 1.0, submit_timeout: float = 120.0):
        self.trainer, self.steps_for, self.more, self.submit, self.held = trainer, steps_for, more, submit, held
        self.log_metric, self.stop_event, self.speed, self.submit_timeout = log_metric, stop_event, speed, submit_timeout
        self.rounds = 0
        self.inner_steps = 0  # H of the last round
        self.steps_per_second = 0.0
        self.last_loss = float("nan")
        self.in_flight: InFlight | None = None
        self._base_version = 0
        self._wait = self._fold_seconds = 0.0
        self._step_t0 = 0.0
        self._first_step_logged = False

    # ------------------------------------------------------------------------- both modes
    def _on_step(self, i: int, loss) -> None:
        if self.stop_event.is_set():
            raise StopRequested()
        if not self._first_step_logged:
            self._first_step_logged = True
            self.log_metric({"event": "first_step", "version": self.held()[1]})
        if self.speed < 1.0:  # emulate slower hardware: idle (1/speed − 1) × the step's own time
            dt = time.perf_counter() - self._step_t0
            time.sleep(dt * (1.0 / self.speed - 1.0))
        self._step_t0 = time.perf_counter()

    def _done(self, H: int, compute: float, stats) -> None:
        self.inner_steps = H
        self.steps_per_second = H / compute if compute > 0 else 0.0
        self.rounds += 1
        self.last_loss = stats.loss if math.isfinite(stats.loss) else float("nan")

    def run(self, overlap: bool) -> None:
        if overlap:
            self._run_overlapped()
        else:
            self._run_blocking()

    # ------------------------------------------------------------------------- blocking
    def _run_blocking(self) -> None:
        while self.more():
            H = self.steps_for()
            params, base = self.held()
            self._step_t0 = t0 = time.perf_counter()
            try:
                delta, stats = self.trainer.run_round(params, H, on_step=self._on_step)
            except StopRequested:
                break
            compute = time.perf_counter() - t0
            self.log_metric({"event": "round", "steps": H, "compute_seconds": compute, "loss": stats.loss,
                             "tokens": stats.tokens, "base_version": base})
            self._done(H, compute, stats)
            self.submit(delta, base, stats, compute)

    # ------------------------------------------------------------------------- overlapped
    def _run_overlapped(self) -> None:
        self._base_version = self.held()[1]  # the model holds θ(v) exactly: nothing is in flight yet
        try:
            while self.more():
                H = self.steps_for()
                self._wait = self._fold_seconds = 0.0
                self._step_t0 = t0 = time.perf_counter()
                try:
                    delta, stats = self.trainer.run_round(None, H, on_step=self._on_step_overlapped,
                                                          before_delta=self._await_reply)
                except StopRequested:
                    break
                compute = time.perf_counter() - t0 - self._wait - self._fold_seconds
                base = self._base_version
                self.log_metric({"event": "round", "steps": H, "compute_seconds": compute, "loss": stats.loss,
                                 "tokens": stats.tokens, "base_version": base, "wait_seconds": self._wait,
                                 "fold_seconds": self._fold_seconds, "overlap": True})
                self._done(H, compute, stats)
                self.in_flight = InFlight(lambda d=delta, b=base, s=stats, c=compute: self.submit(d, b, s, c),
                                          lambda: (*self.held(), 0)).start()
        finally:
            if self.in_flight is not None:  # the last submission is still worth its reply, unless we are leaving
                # (then a reply that may never come, from a barrier or a dead coordinator, must not hold us)
                self.in_flight.thread.join(timeout=5.0 if self.stop_event.is_set() else self.submit_timeout + 10)

    def _on_step_overlapped(self, i: int, loss) -> None:
        self._on_step(i, loss)
        if self.in_flight is not None and self.in_flight.ready:
            self._fold()

    def _await_reply(self) -> None:
        """After a round's last step: the previous submission must be folded in before Δ is taken."""
        flight = self.in_flight
        if flight is not None and not flight.ready:
            t = time.perf_counter()
            while not flight.wait(0.2):
                if not flight.thread.is_alive() or self.stop_event.is_set():
                    break
            self._wait += time.perf_counter() - t
        if self.stop_event.is_set():
            raise StopRequested()
        if flight is not None and flight.ready:
            self._fold()

    def _fold(self) -> None:
        t = time.perf_counter()
        params, version, schedule_step = self.in_flight.take()
        self.in_flight = None
        self.trainer.fold_in(params)
        self.trainer.step = max(self.trainer.step, schedule_step)
        self._base_version = version
        dt = time.perf_counter() - t
        self._fold_seconds += dt
        self._step_t0 += dt  # the emulated slowness idles after steps, not after folds
