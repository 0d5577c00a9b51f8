"""Model cards for adapter and merged-model folders, written from the folder's manifest only.

`write_card(folder)` renders `README.md` (Hub metadata + body) and the loss curve; see `model_cards.cards`.
"""

from persona_lora.model_cards.cards import USER_END, USER_START, write_card

__all__ = ["USER_START", "USER_END", "write_card"]
