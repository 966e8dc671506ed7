"""Chat templates: a sandboxed Jinja environment set up like transformers' own, and a bounded
render for the templates requests bring (only with --trust-request-chat-template).

The sandbox keeps a template away from Python's internals, but not from the CPU or memory: nested
`range` loops run for hours and `'ab ' * 400000000` builds a gigabyte in one call. So a request's
template renders in a forked worker process with a deadline, an address-space limit and a limit
on the rendered length; the worker is killed when the deadline passes. The model's own template
(read from its directory, trusted) renders in-process.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIMEOUT_S = 1.0
"""How long a request's template may take, from its worker's start to its answer."""
RENDER_MEMORY_BYTES = 512 << 20
"""Address space a request's template may add to its worker."""
MAX_RENDER_CHARS = 16 << 20
"""Longest text a request's template may render when the caller names no limit."""


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (raise_exception), failed to render, or went
    past a rendering limit."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used to mark assistant turns) renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's Extension API)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox that cannot reach Python internals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """Render, with every failure of the template's own as a ChatTemplateError."""
    try:
        return template.render(context)
    except MemoryError:
        raise ChatTemplateError("chat template: rendering ran out of memory") from None
    except Exception as e:  # the template's own errors, and what it does with odd messages
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from e


# -- a request's template, rendered in a worker process -------------------------------------------
def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at what it maps now plus extra_bytes (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, mapped + extra_bytes))
    except (ImportError, OSError, ValueError):  # no /proc or no rlimits: time still bounds it
        pass


def _render_worker(conn: Connection, source: str, context: dict[str, Any], max_chars: int,
                   memory_bytes: int) -> None:
    """Worker process body: sends (True, text) or (False, why)."""
    _limit_memory(memory_bytes)
    try:
        try:
            template = compile_chat_template(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat_template does not compile: {e}") from e
        text = render(template, context)
        if len(text) > max_chars:
            raise ChatTemplateError(f"chat_template rendered {len(text)} characters; at most "
                                    f"{max_chars} are accepted")
        conn.send((True, text))
    except (ChatTemplateError, MemoryError) as e:
        conn.send((False, str(e) if isinstance(e, ChatTemplateError)
                   else "chat template: rendering ran out of memory"))
    finally:
        conn.close()


def _mp_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a small server process that has only this module loaded: forking the
    router itself would copy its threads' locks (gRPC, uvloop) into the child."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:  # no forkserver (Windows)
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload([__name__])
    return ctx


def render_isolated(source: str, context: dict[str, Any], max_chars: int,
                    timeout_s: float = RENDER_TIMEOUT_S,
                    memory_bytes: int = RENDER_MEMORY_BYTES) -> str:
    """Compile and render an untrusted template source in a worker process; ChatTemplateError
    when it fails, takes longer than timeout_s, needs more than memory_bytes, or renders more
    than max_chars characters. Blocks (call it from a thread, not an event loop)."""
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_render_worker, daemon=True, name="chat-template",
                         args=(sender, source, context, max_chars, memory_bytes))
    try:
        worker.start()
        sender.close()
        if not receiver.poll(timeout_s):
            raise ChatTemplateError(f"chat_template took longer than {timeout_s:g} s to render")
        ok, value = receiver.recv()
    except EOFError:  # the worker died without answering: killed by its memory limit
        raise ChatTemplateError("chat template: rendering ran out of memory") from None
    finally:
        with contextlib.suppress(ValueError, AttributeError):  # a worker that never started
            worker.kill()
            worker.join()
            worker.close()
        receiver.close()
    if not ok:
        raise ChatTemplateError(value)
    return value
