"""Book → character dataset: quoted spans, speaker attribution, chat records.

Standard library only (no ML imports): the trainer, chat and eval code read what this writes.
"""

from wonderland.data.book import default_book_path
from wonderland.data.dataset import build_dataset, character_system_prompt, list_characters, load_chat_jsonl

__all__ = ["build_dataset", "default_book_path", "load_chat_jsonl", "character_system_prompt", "list_characters"]
