"""Model-based property tests: any interleaving of push/push_many/pop/pop_many/peek of any sizes gives
the sequence a Python deque gives, and a ring with overflow="fail" is full exactly when shm.h's byte
accounting (8-byte header, payload padded to 8, a padding record at the wrap) says it is."""

from __future__ import annotations

import uuid
from collections import deque
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from simbridge.shm import Full, Ring, Timeout

CAPACITY = 256
PAIR = np.dtype([("a", "<i8"), ("b", "<i4")])
FIXED_CAPACITY = 8
MACHINE_SETTINGS = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

payloads = st.binary(max_size=CAPACITY // 2 - 8)
types = st.integers(0, 9)


def _record_units(length: int) -> int:
    return 8 + (length + 7) // 8 * 8


class VariableRingModel(RuleBasedStateMachine):
    """A producer and its consumer in one process, against a deque and a byte-exact position model."""

    def __init__(self) -> None:
        super().__init__()
        self.name = f"test-model-{uuid.uuid4().hex[:12]}"
        self.producer = Ring.create(self.name, capacity=CAPACITY, overflow="fail")
        self.consumer = Ring.open(self.name, timeout=1)
        self.model: deque[tuple[int, bytes, int]] = deque()  # (type, payload, end position)
        self.tail = 0
        self.head = 0

    def _fits(self, length: int) -> bool:
        total, to_end = _record_units(length), CAPACITY - self.tail % CAPACITY
        need = total if total <= to_end else to_end + total
        return CAPACITY - (self.tail - self.head) >= need

    def _append(self, type_: int, payload: bytes) -> None:
        total, to_end = _record_units(len(payload)), CAPACITY - self.tail % CAPACITY
        if total > to_end:
            self.tail += to_end  # the padding record
        self.tail += total
        self.model.append((type_, payload, self.tail))

    def _take(self) -> tuple[int, bytes]:
        type_, payload, end = self.model.popleft()
        self.head = end
        return type_, payload

    @rule(payload=payloads, type_=types)
    def push(self, payload: bytes, type_: int) -> None:
        fits = self._fits(len(payload))
        try:
            self.producer.push(payload, type=type_)
        except Full:
            assert not fits, "Full although the record fits"
            return
        assert fits, "accepted although the model says the ring is full"
        self._append(type_, payload)

    @rule(batch=st.lists(payloads, max_size=12), type_=types)
    def push_many(self, batch: list[bytes], type_: int) -> None:
        expected = 0
        for payload in batch:
            if not self._fits(len(payload)):
                break
            self._append(type_, payload)
            expected += 1
        try:
            pushed = self.producer.push_many(batch, type=type_)
        except Full as full:
            assert expected < len(batch) and full.pushed == expected
        else:
            assert expected == len(batch) and pushed == expected

    @rule()
    def pop(self) -> None:
        if not self.model:
            try:
                self.consumer.pop(timeout=0)
            except Timeout:
                return
            raise AssertionError("popped a record from an empty ring")
        assert self.consumer.pop_typed(timeout=0) == self._take()

    @rule(count=st.integers(1, 20))
    def pop_many(self, count: int) -> None:
        if not self.model:
            return
        got = self.consumer.pop_many(count, timeout=0, typed=True)
        assert got == [self._take() for _ in range(min(count, len(self.model)))]

    @precondition(lambda self: bool(self.model))
    @rule()
    def peek(self) -> None:
        assert self.consumer.peek(timeout=0) == self.model[0][1]

    @invariant()
    def counters_agree(self) -> None:
        counters = self.producer.counters()
        assert counters["pushed"] - counters["popped"] == len(self.model)

    def teardown(self) -> None:
        self.consumer.close()
        self.producer.close()
        Path(f"/dev/shm/simbridge.{self.name}").unlink(missing_ok=True)


class FixedRingModel(RuleBasedStateMachine):
    """Fixed records: batches of any size against a ring of 8, popped into arrays of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.name = f"test-fmodel-{uuid.uuid4().hex[:12]}"
        self.producer = Ring.create(self.name, capacity=FIXED_CAPACITY, record_dtype=PAIR, overflow="fail")
        self.consumer = Ring.open(self.name, timeout=1)
        self.model: deque[tuple[int, int]] = deque()
        self.next = 0

    @rule(count=st.integers(0, 12))
    def push_many(self, count: int) -> None:
        batch = np.zeros(count, PAIR)
        batch["a"] = np.arange(self.next, self.next + count)
        batch["b"] = -batch["a"]
        room = FIXED_CAPACITY - len(self.model)
        try:
            pushed = self.producer.push_many(batch)
        except Full as full:
            assert count > room and full.pushed == room
            pushed = room
        else:
            assert count <= room and pushed == count
        for i in range(pushed):
            self.model.append((self.next + i, -(self.next + i)))
        self.next += count

    @rule(size=st.integers(1, 12))
    def pop_many(self, size: int) -> None:
        out = np.empty(size, PAIR)
        if not self.model:
            try:
                self.consumer.pop_many(out, timeout=0)
            except Timeout:
                return
            raise AssertionError("popped from an empty ring")
        n = self.consumer.pop_many(out, timeout=0)
        expected = [self.model.popleft() for _ in range(min(size, len(self.model)))]
        assert [(int(r["a"]), int(r["b"])) for r in out[:n]] == expected

    @precondition(lambda self: bool(self.model))
    @rule()
    def pop_one(self) -> None:
        record = self.consumer.pop(timeout=0)
        assert (int(record["a"]), int(record["b"])) == self.model.popleft()

    def teardown(self) -> None:
        self.consumer.close()
        self.producer.close()
        Path(f"/dev/shm/simbridge.{self.name}").unlink(missing_ok=True)


TestVariableRing = VariableRingModel.TestCase
TestVariableRing.settings = MACHINE_SETTINGS
TestFixedRing = FixedRingModel.TestCase
TestFixedRing.settings = MACHINE_SETTINGS
