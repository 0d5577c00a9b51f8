"""The Hub metadata of a card: the YAML header the Hub reads to link, filter and label the repo.

The header is what makes an adapter findable on the Hub (its base model's "adapters" tab, license and language
filters, the peft/transformers loading widget), and the Hub rejects or mislabels what it does not know. So only
facts from the manifest go in, a base is linked only when it is a Hub repo a reader can open, and a licence the
Hub does not list is published as `other` with its own name.
"""

from __future__ import annotations

import re
from typing import Any

from persona_lora.artifact import BaseModelInfo, DatasetInfo, Manifest
from persona_lora.hub_ids import base_identity_tag, is_repo_id
from persona_lora.model_cards.privacy import looks_like_local_path

# License ids the Hub knows; anything else is published as `other` with a `license_name`.
_HUB_LICENSES = set(
    "apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 "
    "bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc "
    "cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 "
    "cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 "
    "cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 "
    "eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl "
    "osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 "
    "llama3.2 llama3.3 llama4 gemma other".split()
)


def base_is_on_hub(base: BaseModelInfo) -> bool:
    """Whether `base_model.id` names a Hugging Face repo a reader can open (not a local folder, not ModelScope):
    only then does the card link the base and declare itself its adapter or merge."""
    bid = base.id or ""
    if base.source not in (None, "hf") or looks_like_local_path(bid):
        return False
    return is_repo_id(bid, owner_optional=True)


def hub_license(manifest: Manifest) -> tuple[str | None, str | None]:
    """(license, license_name) for the header: the run's own `license` first, else the base's, since an adapter
    usually inherits its base's terms; (None, None) when neither is known."""
    for value in (manifest.license, manifest.base_model.license):
        if value and value.strip():
            lic = value.strip().lower()
            if lic in _HUB_LICENSES:
                return lic, None
            return "other", re.sub(r"[^a-z0-9.]+", "-", lic).strip("-") or None
    return None, None


def _tag(s: str) -> str:
    """A Hub tag: lower case, with anything outside `[a-z0-9_.-]` folded to dashes."""
    return re.sub(r"[^a-z0-9_.-]+", "-", s.lower()).strip("-")


def card_data(m: Manifest, *, eval_results: list | None = None, model_name: str | None = None):
    """The Hub metadata (`ModelCardData`) for a scrubbed manifest: base and relation (so the card lists under its
    base's adapters or merges), dataset, languages, licence, library and tags; with `eval_results` (from
    `persona-lora card --eval`) also the `model-index` the Hub shows as evaluation results, under `model_name`."""
    from huggingface_hub import ModelCardData

    merged = m.kind == "merged"
    base = m.base_model
    dataset = m.dataset or DatasetInfo()
    fields: dict[str, Any] = {}
    if base_is_on_hub(base):
        fields["base_model"] = base.id
    if dataset.source == "hub" and dataset.hub_id:
        fields["datasets"] = [dataset.hub_id]
    if langs := [x for x in dataset.language if x.strip()]:
        fields["language"] = langs
    fields["library_name"] = "transformers" if merged else "peft"
    lic, lic_name = hub_license(m)
    if lic:
        fields["license"] = lic
    if lic_name:
        fields["license_name"] = lic_name
    fields["pipeline_tag"] = "text-generation"
    tags = ["lora", "persona", "persona-lora"]
    if base.model_type and _tag(base.model_type):
        tags.append(_tag(base.model_type))
    tags.append("merge" if merged else "peft")
    if base.config_sha256:  # the base's identity even when it is a local folder: `list --base FOLDER` finds it
        tags.append(base_identity_tag(base.config_sha256))
    fields["tags"] = tags
    if "base_model" in fields:
        fields["base_model_relation"] = "merge" if merged else "adapter"
    if eval_results:
        fields["model_name"] = model_name or "adapter"
        fields["eval_results"] = eval_results
    return ModelCardData(**fields)
