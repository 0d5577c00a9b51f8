"""Typed errors for the user's mistakes.

Every module raises a subclass of `PersonaLoraError` for problems the user can fix (bad data, bad config,
missing model, hub refusals). The CLI turns them into one clear message and an exit code, never a traceback.
The message must name the place (file, record, option) and the fix.
"""

from __future__ import annotations


class PersonaLoraError(Exception):
    """A problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(PersonaLoraError):
    """Wrong command-line use (conflicting or missing options)."""

    exit_code = 2


class ConfigError(PersonaLoraError):
    """A training/demo config is invalid; `problems` lists every problem found, each naming the key and the fix."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"invalid config{f' {source}' if source else ''}:"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class DataError(PersonaLoraError):
    """A dataset is invalid; `problems` lists all of them (file, line/record, field, fix)."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} found" if source else f"{n} problem(s) found"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class SourceFileError(DataError):
    """One problem with a whole input file (empty, binary, wrong encoding, nothing recognised), said in one line
    that names the file and the fix, without the problem-list header of `DataError`."""

    def __init__(self, message: str):
        PersonaLoraError.__init__(self, message)
        self.problems = [message]
        self.source = None


class EndpointError(PersonaLoraError):
    """An OpenAI-compatible endpoint failed requests after every retry; the message says which, why, and what was
    kept (answers already received are cached, so a re-run sends only the rest)."""


class ModelLoadError(PersonaLoraError):
    """A base model, tokenizer or adapter could not be found or loaded."""


class ManifestError(PersonaLoraError):
    """An adapter folder's manifest is missing or corrupt."""


class HubError(PersonaLoraError):
    """A hub operation failed (auth, not found, network); the message says how to fix it."""


class VerificationError(PersonaLoraError):
    """A pulled or merged artifact failed verification (pickle weights, base mismatch, corrupt file)."""


class TrainingInterrupted(PersonaLoraError):
    """Training stopped early on Ctrl-C: a checkpoint and the adapter of the last step reached were saved, but
    the run is not complete, so the command must not look successful (`train && push` would publish it)."""

    exit_code = 130
