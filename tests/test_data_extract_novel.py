"""`data extract --format novel` against the local OpenAI-protocol test server (the real `openai` client, a real
socket): the asked JSON, overlap de-duplication, the cache (a re-run and a resume after kill -9 send no answered
chunk again), retries of garbage, cut JSON, 429 and a hanging request, refusals, --dry-run, --concurrency."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.train.data.novel_chunks import chunk_text

REPO = Path(__file__).resolve().parents[1]
CHUNK, OVERLAP = 400, 120
_QUOTE = re.compile(r"(\S{1,3})说：“([^”]*)”")
NAMES = ["林婉", "皇后", "小桃"]


def novel_text(chapters: int = 3, per_chapter: int = 12) -> tuple[str, list[tuple[str, str]]]:
    """Our own prose: chapters of narration and quoted speech; returns the text and its (speaker, line) in order."""
    parts, lines = [], []
    for c in range(1, chapters + 1):
        parts.append(f"第{c}章 春深")
        for i in range(per_chapter):
            if i % 3 == 2:
                parts.append(f"窗外的风吹了一阵又一阵，第{c}章第{i}段只写了天色和宫墙。")
                continue
            name = NAMES[(c + i) % 3]
            line = f"这是第{c}章的第{i}句话，说给对面的人听。"
            parts.append(f"{name}说：“{line}”")
            lines.append((name, line))
    return "\n".join(parts) + "\n", lines


def model_answer(req) -> str:
    """What a good extraction model answers: every quoted line of the chunk, in order, as the asked JSON."""
    dialogues = [{"speaker": s, "line": line} for s, line in _QUOTE.findall(req.last_user)]
    return json.dumps({"dialogues": dialogues}, ensure_ascii=False)


@pytest.fixture
def novel(tmp_path):
    text, lines = novel_text()
    path = tmp_path / "novel.txt"
    path.write_text(text, encoding="utf-8")
    return path, text, lines


@pytest.fixture
def server(openai_server):
    openai_server.models = ["extractor", "other"]
    openai_server.script(model_answer)
    return openai_server


def extract(capsys, path: Path, server, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["data", "extract", str(path), "--out", str(out), "--format", "novel", "--endpoint", server.url,
                 "--model", "extractor", "--cache-dir", str(out.parent / "cache"), "--chunk-chars", str(CHUNK),
                 "--overlap-chars", str(OVERLAP), "--retry-delay", "0", *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def speech(out: Path) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return [(r["speaker"], r["line"]) for r in records if r["kind"] == "speech"]


def n_chunks(text: str) -> int:
    return len(chunk_text(text, chunk_chars=CHUNK, overlap_chars=OVERLAP))


def test_fresh_run_sends_each_chunk_once_and_a_rerun_sends_nothing(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    chunks = n_chunks(text)
    assert chunks >= 4
    code, stdout, err = extract(capsys, path, server, out)
    assert code == 0, err
    assert len(server.requests) == chunks and len({r.last_user for r in server.requests}) == chunks
    assert f"{chunks} chunks: 0 from the cache, {chunks} sent ({chunks} requests), 0 failed" in stdout
    req = server.requests[0]
    assert req.params["response_format"]["type"] == "json_schema" and req.params["temperature"] == 0
    assert req.messages[0]["role"] == "system" and req.messages[1]["content"] in text
    # the overlap is real (some lines were sent twice) and de-duplicated (each is in the output once)
    asked = sum(len(_QUOTE.findall(r.last_user)) for r in server.requests)
    assert asked > len(lines)
    assert speech(out) == lines
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records[0]["settings"]["overlap_repeats_dropped"] == asked - len(lines)
    assert records[0]["settings"]["model"] == "extractor" and records[0]["settings"]["prompt_version"]
    assert sorted({r["scene"] for r in records[1:]}) == [0, 1, 2]  # chapters are the scenes
    first = out.read_bytes()

    code, stdout, _ = extract(capsys, path, server, out, "--overwrite")
    assert code == 0 and len(server.requests) == chunks  # nothing sent again
    assert f"{chunks} chunks: {chunks} from the cache, 0 sent (0 requests), 0 failed" in stdout
    assert out.read_bytes() == first

    code, _, _ = extract(capsys, path, server, out, "--overwrite", "--model", "other")  # another model: asked
    assert code == 0 and len(server.requests) == 2 * chunks


def test_garbage_and_json_cut_midway_are_retried_then_counted_as_failed(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    chunks = n_chunks(text)
    seen: dict[str, int] = {}

    def flaky(req):
        seen[req.last_user] = seen.get(req.last_user, 0) + 1
        if seen[req.last_user] == 1:
            return "Sure! Here are the dialogues you asked for:"  # not JSON
        if "第2章" in req.last_user:
            return model_answer(req)[:40]  # JSON cut mid-way, every time
        return model_answer(req)

    server.script(flaky)
    code, _, err = extract(capsys, path, server, out, "--retries", "2")
    failed = [c for c in chunk_text(text, chunk_chars=CHUNK, overlap_chars=OVERLAP) if "第2章" in c.text]
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{len(failed)} of {chunks} chunks failed" in err and f"chunk {failed[0].index + 1}: the answer was " \
        "not the asked JSON: not JSON" in err
    assert "run the same command again" in err and "nothing written" in err and not out.exists()
    assert len(server.requests) == 2 * chunks + len(failed)  # 3 tries for the failing ones, 2 for the others

    server.script(model_answer)  # the endpoint behaves now: only the failed chunks are asked
    before = len(server.requests)
    code, _, err = extract(capsys, path, server, out)
    assert code == 0, err
    assert len(server.requests) - before == len(failed)
    assert speech(out) == lines


def test_allow_failed_writes_the_rest_with_each_gap_marked(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    server.script(lambda req: "{}" if "第3章" in req.last_user else model_answer(req))
    code, stdout, _ = extract(capsys, path, server, out, "--retries", "0", "--allow-failed")
    assert code == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    gaps = [r for r in records if r["kind"] == "gap"]
    assert gaps and records[0]["settings"]["failed_chunks"] == [g["source_chunk"] for g in gaps]
    assert all("failed" in g["text"] for g in gaps)
    got = speech(out)
    assert got and all(line in lines for line in got) and len(got) < len(lines)


def test_429_and_a_hanging_request_are_retried(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    server.fail("429", times=2)
    server.fail("hang", times=1)
    code, _, err = extract(capsys, path, server, out, "--timeout", "1", "--concurrency", "2")
    assert code == 0, err
    assert len(server.requests) == n_chunks(text) + 3 and speech(out) == lines


def test_a_429s_retry_after_is_waited_and_said(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    server.fail("429", times=1, retry_after="1")
    code, stdout, err = extract(capsys, path, server, out, "--concurrency", "1")
    assert code == 0, err
    assert "chunk 1: rate-limited (HTTP 429), the endpoint asks to wait 1 s (Retry-After); waiting 1 s before try " \
           "2 of 4" in stdout
    assert len(server.requests) == n_chunks(text) + 1 and speech(out) == lines


def test_retry_after_replaces_the_back_off_up_to_a_cap(server):
    from persona_lora.train.data.novel_chunks import Chunk
    from persona_lora.train.data.novel_extract import MAX_RETRY_AFTER, EndpointSettings, NovelClient

    slept, said = [], []
    client = NovelClient(EndpointSettings(server.url, "extractor", retries=4, backoff=0.5), sleep=slept.append,
                         progress=said.append)
    server.fail("429", times=1, retry_after="7")
    server.fail("429", times=1, retry_after=str(int(MAX_RETRY_AFTER * 100)))  # an hour-long quota reset
    server.fail("429", times=1, retry_after="Wed, 21 Oct 2026 07:28:00 GMT")  # the date form: the back-off
    server.fail("429", times=1)  # no header: the back-off
    chunk = Chunk(0, 0, 10, 0, '林婉说：“来了。”')
    try:
        assert client.ask(chunk) == [{"speaker": "林婉", "line": "来了。"}]
    finally:
        client.close()
    assert slept[:2] == [7.0, MAX_RETRY_AFTER] and len(slept) == 4 and len(server.requests) == 5
    assert 0.5 * 4 * 0.75 <= slept[2] <= 0.5 * 4 * 1.25 and 0.5 * 8 * 0.75 <= slept[3] <= 0.5 * 8 * 1.25
    assert said == [
        "chunk 1: rate-limited (HTTP 429), the endpoint asks to wait 7 s (Retry-After); waiting 7 s before try 2 of 5",
        f"chunk 1: rate-limited (HTTP 429), the endpoint asks to wait {MAX_RETRY_AFTER * 100:g} s (Retry-After); "
        f"waiting {MAX_RETRY_AFTER:g} s, the most this waits for one retry before try 3 of 5"]


def test_a_server_refusing_json_schema_is_asked_without_it(novel, server, tmp_path, capsys):
    path, text, lines = novel
    out = tmp_path / "d.jsonl"
    server.fail("400", times=1)
    code, _, err = extract(capsys, path, server, out, "--concurrency", "1")
    assert code == 0, err
    assert "response_format" in server.requests[0].params
    assert all("response_format" not in r.params for r in server.requests[1:])
    assert len(server.requests) == n_chunks(text) + 1 and speech(out) == lines
    header = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert header["settings"]["json_schema"] is False


def test_refusals_stop_the_run_with_one_message_that_never_holds_the_key(novel, server, tmp_path, capsys,
                                                                        monkeypatch):
    path, text, _ = novel
    out = tmp_path / "d.jsonl"
    server.api_key = "sk-right-key"
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-secret-123")
    code, stdout, err = extract(capsys, path, server, out, "--api-key-env", "WRONG_KEY", "--concurrency", "1")
    assert code == 2 and err.count("\n") == 1 and "refused the key in $WRONG_KEY" in err
    assert "sk-wrong-secret-123" not in err + stdout and not out.exists()
    monkeypatch.setenv("RIGHT_KEY", "sk-right-key")
    code, _, err = extract(capsys, path, server, out, "--api-key-env", "RIGHT_KEY", "--model", "nope",
                           "--concurrency", "1")
    assert code == 2 and err.count("\n") == 1 and "does not serve model 'nope'" in err and not out.exists()
    assert len(server.requests) == 1  # stopped at the first refusal, not once per chunk

    code, stdout, err = extract(capsys, path, server, out, "--api-key-env", "RIGHT_KEY")
    assert code == 0, err
    written = out.read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in (tmp_path / "cache").iterdir())
    assert "sk-right-key" not in written + stdout + err


def test_an_endpoint_that_fails_every_chunk_is_one_message_and_writes_nothing(novel, server, tmp_path, capsys):
    path, text, _ = novel
    out = tmp_path / "d.jsonl"
    server.fail("500")
    code, _, err = extract(capsys, path, server, out, "--retries", "1")
    chunks = n_chunks(text)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"every chunk failed ({chunks} of {chunks})" in err and "HTTP 500" in err and not out.exists()
    assert not list((tmp_path / "cache").glob("*.json"))
    unreachable = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    code = main(["data", "extract", str(path), "--out", str(out), "--format", "novel", "--endpoint", unreachable,
                 "--model", "m", "--retries", "0", "--cache-dir", str(tmp_path / "cache")])
    _, err = capsys.readouterr()
    assert code == 1 and "cannot reach http://127.0.0.1:9/v1" in err and not out.exists()


def test_dry_run_counts_chunks_and_tokens_and_sends_nothing(novel, server, tmp_path, capsys):
    path, text, _ = novel
    out = tmp_path / "d.jsonl"
    chunks = n_chunks(text)
    code, stdout, _ = extract(capsys, path, server, out, "--dry-run")
    assert code == 0 and not server.requests and not out.exists()
    assert re.search(rf"dry run: {chunks} chunks of up to 400 characters \(120 overlap\), about [\d,]+ prompt "
                     rf"tokens.*0 already answered in the cache; would send {chunks}", stdout)
    assert extract(capsys, path, server, out)[0] == 0
    _, stdout, _ = extract(capsys, path, server, out, "--dry-run")
    assert f"{chunks} already answered in the cache; would send 0" in stdout


def test_concurrency_bounds_the_requests_in_flight(novel, server, tmp_path, capsys):
    path, _, _ = novel
    server.token_delay = 0.003  # a whole answer takes ~1 s
    for concurrency in (1, 3):
        out = tmp_path / f"d{concurrency}.jsonl"
        server.requests.clear()
        code, _, _ = extract(capsys, path, server, out, "--concurrency", str(concurrency), "--cache-dir",
                             str(tmp_path / f"cache{concurrency}"))
        assert code == 0
        spans = [(r.started, r.finished) for r in server.requests]
        peak = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
        assert peak == concurrency


@pytest.mark.slow
def test_a_resume_after_kill_9_sends_no_answered_chunk_again(novel, server, tmp_path):
    path, text, lines = novel
    out, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    chunks = n_chunks(text)
    server.token_delay = 0.004  # ~1 s per chunk: the kill lands mid-run
    cmd = [sys.executable, "-m", "persona_lora", "data", "extract", str(path), "--out", str(out), "--format",
           "novel", "--endpoint", server.url, "--model", "extractor", "--cache-dir", str(cache), "--chunk-chars",
           str(CHUNK), "--overlap-chars", str(OVERLAP), "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.glob("*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs
    finally:
        proc.wait()
    answered = {json.loads(p.read_text(encoding="utf-8"))["chunk_sha256"] for p in cache.glob("*.json")}
    assert 2 <= len(answered) < chunks and not out.exists()
    sent_before = len(server.requests)
    server.token_delay = 0.0
    assert main(cmd[3:]) == 0
    import hashlib

    resent = [r for r in server.requests[sent_before:]
              if hashlib.sha256(r.last_user.encode()).hexdigest() in answered]
    assert resent == []
    assert len(server.requests) - sent_before == chunks - len(answered)
    assert speech(out) == lines


@pytest.mark.slow
def test_ctrl_c_stops_with_exit_130_keeps_the_answers_and_writes_no_output(novel, server, tmp_path):
    import signal

    path, text, lines = novel
    out, cache = tmp_path / "d.jsonl", tmp_path / "cache"
    server.token_delay = 0.004
    cmd = [sys.executable, "-m", "persona_lora", "data", "extract", str(path), "--out", str(out), "--format",
           "novel", "--endpoint", server.url, "--model", "extractor", "--cache-dir", str(cache), "--chunk-chars",
           str(CHUNK), "--overlap-chars", str(OVERLAP), "--concurrency", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, (proc.returncode, err)
    assert not out.exists() and 1 <= len(list(cache.glob("*.json"))) < n_chunks(text)
    assert main(cmd[3:]) == 0 and speech(out) == lines
