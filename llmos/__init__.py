"""llmos runtime core: model import, tokenizer, engine, arbitration. No D-Bus here."""
