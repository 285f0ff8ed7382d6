"""``sharded.one_behind``: the publishing transaction writes layer L while layer L + 1 is computed.

The writes must overlap the caller, keep their order, surface their errors, and never outlive the
block: a transaction around it rolls back only after they have stopped.
"""

from __future__ import annotations

import threading
import time

import pytest

from catalog.runs.sharded import one_behind


class Boom(Exception):
    pass


def test_calls_run_in_order_beside_the_caller() -> None:
    done: list[int] = []
    released = threading.Event()
    went_on: list[bool] = []

    def first() -> None:
        went_on.append(released.wait(10))  # only the caller, going on after submit, can set it
        done.append(0)

    with one_behind() as submit:
        submit(first)
        released.set()
        submit(lambda: done.append(1))
        submit(lambda: done.append(2))
    assert went_on == [True]
    assert done == [0, 1, 2]  # and all of them finished when the block was left


def test_an_error_is_raised_at_the_next_submit_and_stops_the_block() -> None:
    ran: list[str] = []

    def fails() -> None:
        raise Boom("write failed")

    with pytest.raises(Boom, match="write failed"), one_behind() as submit:
        submit(fails)
        ran.append("computed the next layer")
        submit(lambda: ran.append("never written"))
    assert ran == ["computed the next layer"]


def test_an_error_of_the_last_call_is_raised_on_leaving() -> None:
    def fails() -> None:
        raise Boom("last write failed")

    with pytest.raises(Boom, match="last write failed"), one_behind() as submit:
        submit(fails)


@pytest.mark.parametrize("error", [Boom("computing failed"), KeyboardInterrupt()])
def test_an_error_in_the_block_waits_for_the_pending_call(error: BaseException) -> None:
    finished: list[bool] = []

    def slow() -> None:
        time.sleep(0.3)
        finished.append(True)

    with pytest.raises(type(error)), one_behind() as submit:
        submit(slow)
        raise error
    assert finished == [True]  # the write had stopped before the error left the block
