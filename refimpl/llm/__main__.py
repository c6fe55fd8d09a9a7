"""``python -m refimpl.llm``: the LLM's command line, defined in :mod:`refimpl.cli`.

The command line names cache policies of the techniques (``--cache kivi2``), so it lives above them; this entry
point (which nothing imports) only runs it.
"""

from refimpl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
