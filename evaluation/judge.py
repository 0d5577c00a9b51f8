"""The optional judge: an OpenAI-compatible chat model compares the base's and an adapter's answer to each prompt.

Why both orders: judges favour one position (often the first answer shown), so every pair is judged twice, base
as A and adapter as A, and a prompt's outcome is the mean of both verdicts (a judge that contradicts itself
gives a tie). A reply whose verdict cannot be read is counted as invalid, never guessed and never fatal; a judge
that cannot be reached at all stops the command (the finished rows are kept, a rerun continues).

The rubric is a text file the user can replace (`--judge-rubric`); it must hold `{prompt}`, `{answer_a}` and
`{answer_b}`, and may hold `{system_prompt}` and `{reference}`. The judge is only ever called when
`--judge-endpoint` is given. The key is read from the environment variable `--judge-key-env` names and is
never printed or written.

Protocol: POST `{endpoint}/chat/completions` with `model`, `messages` (one user message: the filled rubric) and
`temperature: 0`, through the `openai` client when installed, else `httpx` on the same protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from persona_lora.errors import PersonaLoraError, UsageError
from persona_lora.evaluation.sets import DATA_DIR
from persona_lora.openai_endpoint import read_api_key

log = logging.getLogger(__name__)

RUBRIC_FILE = DATA_DIR / "judge_rubric.txt"
REQUIRED = ("{prompt}", "{answer_a}", "{answer_b}")
ORDERS = ("base-first", "adapter-first")  # which model's answer is shown as A
MAX_RAW = 300  # characters of each raw judge reply kept in the rows (enough to see why it was invalid)


class JudgeError(PersonaLoraError):
    """The judge endpoint could not be used (unreachable, refused the key, unknown model)."""


def read_rubric(path: Path | None) -> str:
    path = Path(path) if path else RUBRIC_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--judge-rubric {path}: cannot be read ({e}); give a UTF-8 text file") from None
    missing = [p for p in REQUIRED if p not in text]
    if missing:
        raise UsageError(f"--judge-rubric {path} lacks {', '.join(missing)}: the judge would not see both answers; "
                         f"put the placeholders where they belong (see {RUBRIC_FILE.name} in persona-lora)")
    return text


def fill(rubric: str, *, system_prompt: str | None, prompt: str, reference: str, answer_a: str, answer_b: str) -> str:
    """The rubric with its placeholders replaced in one pass (an answer holding `{answer_b}` stays text)."""
    values = {"{system_prompt}": system_prompt or "(none)", "{prompt}": prompt, "{reference}": reference,
              "{answer_a}": answer_a, "{answer_b}": answer_b}
    return re.sub("|".join(re.escape(k) for k in values), lambda m: values[m.group(0)], rubric)


_VERDICT = re.compile(r"verdict\W{0,4}(A|B|tie)\b", re.I)


def parse_verdict(text: object) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply; None when it says none of them clearly."""
    if not isinstance(text, str) or not text.strip():
        return None
    found = _VERDICT.findall(text)
    if not found:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            found = [str(data.get("verdict", data.get("winner", "")))]
        else:
            found = [text.strip().strip(".*\"'` ")]
    value = found[-1].strip().upper()
    if value in ("A", "B"):
        return value
    return "tie" if value == "TIE" else None


def winner(verdict: str | None, order: str) -> str | None:
    """Which model a verdict favours ('base', 'adapter', 'tie'), given which was shown as A."""
    if verdict in (None, "tie"):
        return verdict
    a_side = "base" if order == "base-first" else "adapter"
    return a_side if verdict == "A" else ("adapter" if a_side == "base" else "base")


class Judge:
    """One judge model behind an OpenAI-compatible endpoint."""

    def __init__(self, endpoint: str, model: str, key_env: str | None, rubric_path: Path | None):
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.rubric = read_rubric(rubric_path)
        self.id = f"{model}@{hashlib.sha256(self.rubric.encode('utf-8')).hexdigest()[:12]}"
        # servers that need none ignore it; the client needs one. A key given where its variable's name belongs is
        # never printed back (`read_api_key`)
        self._key = read_api_key(key_env, option="--judge-key-env") if key_env else "no-key"
        self._client = None

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key != "no-key" else text

    def ask(self, content: str) -> str | None:
        """The judge's reply text (None when the reply had no text); JudgeError when the endpoint fails."""
        try:
            import openai
        except ImportError:
            return self._ask_httpx(content)
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.endpoint, api_key=self._key, max_retries=2, timeout=120)
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": content}], temperature=0)
        except (openai.APIResponseValidationError, ValueError):
            return None  # a body that is not a chat completion (an HTML error page): an invalid verdict, not a crash
        except openai.APIStatusError as e:
            raise self._status_error(e.status_code, str(e)) from None
        except openai.APIConnectionError as e:
            raise JudgeError(f"cannot reach --judge-endpoint {self.endpoint} ({type(e).__name__}: {e}); check the URL "
                             "(the API base, e.g. http://127.0.0.1:8000/v1) and that the server runs") from None
        try:
            return reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return None

    def _ask_httpx(self, content: str) -> str | None:
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        try:
            r = httpx.post(f"{self.endpoint}/chat/completions", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {self._key}"})
        except httpx.HTTPError as e:
            raise JudgeError(f"cannot reach --judge-endpoint {self.endpoint} ({type(e).__name__}); check the URL "
                             "(the API base, e.g. http://127.0.0.1:8000/v1) and that the server runs") from None
        if r.status_code >= 400:
            raise self._status_error(r.status_code, r.text[:200])
        try:
            return r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def _status_error(self, status: int, detail: str) -> JudgeError:
        detail = self._redact(detail)
        if status in (401, 403):
            return JudgeError(f"--judge-endpoint {self.endpoint} refused the key (HTTP {status}); check the key in the "
                              "variable --judge-key-env names")
        if status == 404:
            return JudgeError(f"--judge-endpoint {self.endpoint} answered 404 ({detail}); check --judge-model "
                              f"{self.model} and that the URL is the API base (ending in /v1)")
        return JudgeError(f"--judge-endpoint {self.endpoint} answered HTTP {status} ({detail}); the finished rows are "
                          "kept: rerun the same command to continue")

    def judge(self, *, system_prompt: str | None, prompt: str, reference: str, base: str, adapter: str,
              order: str) -> dict:
        """One judgement of one order: the verdict ('A', 'B', 'tie' or None), whom it favours and the raw reply."""
        a, b = (base, adapter) if order == "base-first" else (adapter, base)
        raw = self.ask(fill(self.rubric, system_prompt=system_prompt, prompt=prompt, reference=reference,
                            answer_a=a, answer_b=b))
        verdict = parse_verdict(raw)
        if verdict is None:
            log.warning("judge %s: no verdict in its reply %r; counted as invalid", self.model, str(raw)[:80])
        return {"verdict": verdict, "winner": winner(verdict, order),
                "raw": self._redact(raw)[:MAX_RAW] if isinstance(raw, str) else None}
