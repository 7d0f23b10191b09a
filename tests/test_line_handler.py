"""The log handler: the info lines logged on an event loop are written once per turn of the loop, in order,
and nothing waiting is lost when the process exits, cleanly or on an exception."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
import textwrap

from daemon.logs import LineHandler
from tests.daemon_process import REPO, daemon_env


class Writes(io.StringIO):
    """A stream that keeps each write apart: the outer edge of the handler."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def handler_on(stream: Writes) -> tuple[LineHandler, logging.Logger]:
    handler = LineHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("transcriptd.test.lines")
    logger.propagate = False  # only this handler: not pytest's, not the session's
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return handler, logger


def test_a_turn_of_the_loop_writes_its_info_lines_in_one_write_in_order() -> None:
    stream = Writes()
    _, log = handler_on(stream)

    async def main() -> list[str]:
        for i in range(3):
            log.info("delivery %d", i)
        seen_in_the_turn = list(stream.writes)
        await asyncio.sleep(0)  # the loop's next turn
        return seen_in_the_turn

    assert asyncio.run(main()) == []
    assert stream.writes == ["INFO delivery 0\nINFO delivery 1\nINFO delivery 2\n"]


def test_a_warning_is_written_at_once_after_the_lines_waiting() -> None:
    stream = Writes()
    _, log = handler_on(stream)

    async def main() -> list[str]:
        log.info("first")
        log.warning("mailbox full")
        written = list(stream.writes)
        log.info("after")
        await asyncio.sleep(0)
        return written

    assert asyncio.run(main()) == ["INFO first\nWARNING mailbox full\n"]
    assert stream.getvalue() == "INFO first\nWARNING mailbox full\nINFO after\n"


def test_off_a_loop_a_line_is_written_at_once_and_flush_writes_what_waits() -> None:
    stream = Writes()
    handler, log = handler_on(stream)
    log.info("from a thread")
    assert stream.writes == ["INFO from a thread\n"]

    async def main() -> None:
        log.info("waiting")
        handler.flush()
        assert stream.getvalue().endswith("INFO waiting\n")

    asyncio.run(main())
    assert stream.getvalue() == "INFO from a thread\nINFO waiting\n"


def test_lines_logged_on_a_loop_that_never_turns_again_are_written_by_the_next_line() -> None:
    stream = Writes()
    _, log = handler_on(stream)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))

        async def last_turn() -> None:
            log.info("the loop's last line")

        loop.run_until_complete(last_turn())
    finally:
        loop.close()  # the scheduled write never runs
    log.info("later, off the loop")
    assert stream.getvalue() == "INFO the loop's last line\nINFO later, off the loop\n"

    async def again() -> None:
        log.info("on a new loop")
        await asyncio.sleep(0)

    asyncio.run(again())
    assert stream.getvalue().endswith("INFO later, off the loop\nINFO on a new loop\n")


def test_the_text_format_handler_writes_every_waiting_line_when_the_process_dies_of_an_exception() -> None:
    script = textwrap.dedent(
        """
        import asyncio, logging, sys
        from daemon.logs import LineHandler, TextFormatter
        handler = LineHandler(sys.stderr)
        handler.setFormatter(TextFormatter())
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)

        async def main():
            for i in range(50):
                logging.getLogger("transcriptd.deliveries").info("delivery %d", i)
            raise RuntimeError("the loop failed")

        asyncio.run(main())
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "transcriptd.deliveries" in line]
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(i) for i in range(50)]
    assert "RuntimeError: the loop failed" in run.stderr
