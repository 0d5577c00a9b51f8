"""Write an adapter folder's README.md (its Hub model card) from the folder alone.

A card is only worth reading if every statement in it is true, so the card is derived from the two files that
record what actually happened: the run's manifest (`persona_manifest.json`) and PEFT's `adapter_config.json`.
Nothing is typed in by hand, nothing is guessed: a section with no data behind it is left out rather than filled
with a placeholder. The manifest is scrubbed of anything private first (`privacy`), each body section is built
by `sections`, the YAML header is the Hub's own serialization of `ModelCardData` (`metadata`), and the templates
under `templates/` only lay the values out.

Cards are regenerated (after training, before a push, after a pull); regeneration must be byte-identical for an
unchanged folder and must keep what a person wrote between the user-section markers. A README.md someone wrote
without those markers is never lost: it is kept beside the new card.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from persona_lora.artifact import (
    CARD_NAME,
    LOSS_CURVE,
    ChatInfo,
    DatasetInfo,
    DatasetStats,
    Manifest,
    read_manifest,
)
from persona_lora.consistency import check_folder
from persona_lora.errors import UsageError
from persona_lora.model_cards import sections
from persona_lora.model_cards.markdown import code, esc, fenced, is_num, num, tidy
from persona_lora.model_cards.metadata import base_is_on_hub, card_data
from persona_lora.model_cards.preference_section import preference_section
from persona_lora.model_cards.privacy import scrub
from persona_lora.model_cards.run_locally import END as RUN_LOCALLY_END
from persona_lora.model_cards.run_locally import START as RUN_LOCALLY_START
from persona_lora.model_cards.run_locally import adapter_exports, render_run_locally
from persona_lora.model_cards.snippet import usage_snippet
from persona_lora.output_folder import FilesTogether
from persona_lora.peft_compat import is_legacy_spelling

log = logging.getLogger(__name__)

DEFAULT_LOSS_PNG = LOSS_CURVE
USER_START = "<!-- persona-lora:user-start -->"
USER_END = "<!-- persona-lora:user-end -->"
# PEFT's `save_pretrained` writes a stub README.md from its own template (a page of filler); this comment of
# that template tells the stub from a card someone wrote.
_PEFT_DEFAULT_CARD = "<!-- Provide a quick summary of what the model is/does. -->"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# One template per manifest kind; the sections they share are the macros of templates/sections.md.
TEMPLATES = {"adapter": "adapter_card.md", "merged": "merged_card.md"}


def build_context(m: Manifest, adapter_config: dict | None, *, loss_png: str | None, repo_id: str | None = None,
                  tokenizer_in_folder: bool = False, evaluation: dict | None = None,
                  run_locally: str = "") -> dict:
    """Everything the templates show, already formatted and escaped (the templates only lay it out).
    `run_locally`: the "Run it locally" section (`run_locally.render_run_locally`), "" when no GGUF export."""
    merged = m.kind == "merged"
    base = m.base_model
    dataset = m.dataset or DatasetInfo()
    chat = m.chat or ChatInfo()
    base_id = base.id
    name = m.name or None
    own_id = repo_id or name or ("merged-model" if merged else "adapter")
    on_hub = base_is_on_hub(base)
    base_ref = f"[{esc(base_id)}](https://huggingface.co/{base_id})" if on_hub else code(base_id)
    legacy = not merged and adapter_config is not None and is_legacy_spelling(adapter_config, base.model_type)
    tokenizer_from_adapter = chat.template_source == "file" or tokenizer_in_folder
    source_adapter = m.merge.adapter if merged and m.merge is not None else None
    system_prompt = chat.system_prompt
    stats = dataset.stats or DatasetStats()
    trained_on = None
    if dataset.source == "hub" and dataset.hub_id:
        trained_on = code(dataset.hub_id)
    elif dataset.name:
        trained_on = code(dataset.name)
    if trained_on and is_num(stats.train_examples):
        trained_on += f" ({num(stats.train_examples)} training examples)"
    interrupted = m.interrupted_at()
    return {
        "kind": m.kind,
        "interrupted": (f"**Unfinished: training was {esc(interrupted)}.** These weights are from the last step "
                        "reached; `persona-lora train CONFIG --resume` continues the run.") if interrupted else None,
        "name": esc(name or own_id),
        "base_ref": base_ref,
        "base_model_type": code(base.model_type) if base.model_type else None,
        "trained_on": trained_on,
        "preset": code(m.lora.preset) if m.lora is not None and m.lora.preset is not None else None,
        "version": code(m.persona_lora_version) if m.persona_lora_version else None,
        "system_prompt": fenced(system_prompt, "text") if system_prompt else None,
        "snippet": usage_snippet(
            m, base_id=base_id, adapter_id=None if merged else own_id, model_id=own_id if merged else None,
            tokenizer_from_adapter=tokenizer_from_adapter),
        "legacy_spelling": fenced(f"persona-lora upgrade-adapter {name or 'ADAPTER_DIR'}", "bash") if legacy else None,
        "serving": None if merged else sections.serving_section(m),
        "run_locally": run_locally,
        "run_locally_start": RUN_LOCALLY_START,
        "run_locally_end": RUN_LOCALLY_END,
        "demo_command": (fenced(f"persona-lora demo --base {base_id} --adapter {own_id}", "bash") if not merged
                         else fenced(f"persona-lora demo --base {base_id} --adapter {source_adapter}", "bash")
                         if source_adapter else None),
        "merge_command": (fenced(f"persona-lora merge {source_adapter} --base {base_id} --out {own_id}", "bash")
                          if merged and source_adapter else None),
        "merge": sections.merge_section(m) if merged else None,
        "prompt": sections.prompt_section(m),
        "data": sections.data_section(m),
        "preference": None if merged else preference_section(m),
        "hyper": sections.hyper_section(m),
        "coverage": sections.coverage_section(m),
        "results": sections.results_section(m, loss_png),
        "samples": sections.samples_section(m),
        "evaluation": evaluation,
        "provenance": sections.provenance_section(m),
        "user_start": USER_START,
        "user_end": USER_END,
    }


@functools.lru_cache(maxsize=1)
def _environment():
    """The Jinja environment of the card templates: Jinja's defaults (those `ModelCard.from_template` renders
    with) plus a loader, so that a card template can import the sections it shares from templates/sections.md."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR))


def render_card(m: Manifest, adapter_config: dict | None, *, loss_png: str | None, repo_id: str | None = None,
                tokenizer_in_folder: bool = False, evaluation: tuple[dict, list] | None = None,
                run_locally: str = "") -> str:
    """The card text for a scrubbed manifest (`privacy.scrub`; no user section merged in yet).

    Rendered as `ModelCard.from_template` renders: `card_data` is the Hub's YAML of the metadata and the
    metadata fields are variables too, beside the template's own `c`. `evaluation` is the Evaluation section
    and its `model-index` results (`eval_section`), for `card --eval`; `run_locally` the "Run it locally"
    section, for `card --gguf`.
    """
    from huggingface_hub import ModelCard

    section, results = evaluation or (None, None)
    context = build_context(m, adapter_config, loss_png=loss_png, repo_id=repo_id,
                            tokenizer_in_folder=tokenizer_in_folder, evaluation=section, run_locally=run_locally)
    data = card_data(m, eval_results=results, model_name=repo_id or m.name)
    variables = {**data.to_dict(), "c": context}
    content = _environment().get_template(TEMPLATES[m.kind]).render(card_data=data.to_yaml(), **variables)
    return tidy(str(ModelCard(content)))


def _user_section(text: str) -> str | None:
    """What lies between the user markers of an existing card (None when it has no such section)."""
    start = text.find(USER_START)
    end = text.find(USER_END, start + len(USER_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[start + len(USER_START):end]


def keep_user_section(new: str, old: str | None) -> str:
    """`new` with the user section of `old` put back in place of its (empty) one: what a person wrote into a
    card survives every regeneration."""
    kept = _user_section(old) if old else None
    if kept is None:
        return new
    start = new.find(USER_START)
    end = new.find(USER_END, start + len(USER_START))
    if start < 0 or end < 0:  # pragma: no cover - both templates carry the markers
        return new
    return new[: start + len(USER_START)] + kept + new[end:]


def _loss_png_name(m: Manifest) -> str:
    """The manifest's loss curve file name, if it is a plain name inside the folder."""
    name = m.files.loss_curve
    if name and "/" not in name and "\\" not in name and name not in (".", ".."):
        return name
    return DEFAULT_LOSS_PNG


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """`stem.suffix`, or `stem.N.suffix` for the first N not taken (a backup never overwrites a backup)."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, n = folder / f"{stem}.{n}{suffix}", n + 1
    return path


def write_card(folder: Path, *, repo_id: str | None = None, eval_dir: Path | None = None,
               gguf_dirs: list[Path] | None = None) -> Path:
    """(Re)write `folder/README.md` and its loss curve from the folder's manifest; returns the README path.

    `repo_id` (e.g. given by a push) names the adapter in the usage snippet; without it the manifest's name is
    used, which is also the folder name a `persona-lora pull` writes. `eval_dir` (an adapter's `persona-lora eval
    --out` folder) adds the Evaluation section and the Hub's `model-index`. `gguf_dirs` (GGUF exports of this
    adapter, `persona-lora export --for llama.cpp|ollama --out DIR`) add the "Run it locally" section.
    """
    from persona_lora.model_cards.plots import has_loss_points, write_loss_curve

    folder = Path(folder)
    manifest = read_manifest(folder)
    adapter_config = check_folder(folder).adapter_config  # the card describes a consistent folder or none
    m = scrub(manifest)

    with FilesTogether() as files:  # README.md and the loss curve change together, or neither does
        readme = folder / CARD_NAME
        readme_tmp = files.temp(readme)  # first: the file most likely to be refused (a folder of that name, say)
        history = manifest.metrics.history if manifest.metrics is not None else []
        loss_png = None
        if has_loss_points(history):
            png_name = _loss_png_name(manifest)
            if write_loss_curve(history, files.temp(folder / png_name)) is not None:
                loss_png = png_name

        evaluation = None
        if eval_dir is not None:
            from persona_lora.model_cards import eval_section

            if manifest.kind != "adapter":
                raise UsageError(f"--eval: {folder} is a merged model; the Evaluation section is for adapter cards")
            report = eval_section.read_report(eval_dir)
            name = eval_section.adapter_name(report, folder, str(eval_dir))
            evaluation = (eval_section.evaluation_section(report, name), eval_section.eval_results(report, name))
        run_locally = ""
        if gguf_dirs:
            if manifest.kind != "adapter":
                raise UsageError(f"--gguf: {folder} is a merged model; GGUF exports are listed on their adapter's card")
            run_locally = render_run_locally(adapter_exports(folder, list(gguf_dirs)))
        text = render_card(m, adapter_config, loss_png=loss_png, repo_id=repo_id,
                           tokenizer_in_folder=(folder / "tokenizer_config.json").is_file(), evaluation=evaluation,
                           run_locally=run_locally)
        old = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
        if old is not None and _user_section(old) is None:
            if _PEFT_DEFAULT_CARD in old:  # the stub PEFT's save_pretrained writes: nothing of the user's in it
                log.info("%s: replacing PEFT's default card", readme.name)
            else:  # someone's own card: never lost, kept beside the generated one
                backup = _free_name(folder, "README.before-persona-lora", ".md")
                files.temp(backup).write_text(old, encoding="utf-8")
                log.warning("%s had no persona-lora user section (%s ... %s); your text is kept in %s; move what "
                            "should stay into the user section of the new card", readme, USER_START, USER_END,
                            backup.name)
        text = keep_user_section(text, old)
        if text != old:
            with open(readme_tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            log.info("wrote %s", readme)
    return readme
