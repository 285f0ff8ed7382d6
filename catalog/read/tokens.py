"""Reading a token argument against a run's vocabulary (decoded token texts, special tokens included).

- ``id:123``: that token id;
- ``text:ing``: tokens whose decoded text is exactly ``ing``;
- `` Paris`` (a leading space, or the tokenizer markers ``Ġ`` / ``▁``): exactly the space-marked form;
- ``Paris``: a word: the token ``Paris`` and the token `` Paris`` (with and without the space marker).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.read.errors import InvalidParameter
from catalog.read.schemas import ResolvedToken
from catalog.store.models import Token

SPACE_MARKERS = (" ", "\u0120", "\u2581")  # space, GPT-2's Ġ, SentencePiece's ▁
MAX_TOKEN_ARG = 200


def clean_arg(s: str) -> str:
    # Stored texts had NUL replaced (Postgres text cannot hold it); do the same to what users send.
    return s.replace("\x00", "\ufffd")


def resolve_token(session: Session, run_id: int, given: str, *, vocab_size: int, param: str = "token") -> ResolvedToken:
    """The vocabulary entries ``given`` names; ``InvalidParameter`` when it names none."""
    if not given or len(given) > MAX_TOKEN_ARG:
        raise InvalidParameter(f"{param}: give a token as id:N, text:EXACT, a word, or ' word' "
                               f"(1-{MAX_TOKEN_ARG} characters)")
    given = clean_arg(given)
    query = select(Token.token_id, Token.text).where(Token.run_id == run_id)
    if given.startswith("id:"):
        digits = given[3:].strip()
        if not digits.isdigit() or not 0 <= int(digits) < vocab_size:
            raise InvalidParameter(f"{param}: {given!r} is not a token id of this model (0-{vocab_size - 1})")
        query = query.where(Token.token_id == int(digits))
    elif given.startswith("text:"):
        query = query.where(Token.text == given[5:])
    elif given[0] in SPACE_MARKERS and len(given) > 1:
        query = query.where(Token.text == " " + given[1:])
    else:
        query = query.where(Token.text.in_([given, " " + given]))
    rows = session.execute(query.order_by(Token.token_id)).tuples().all()
    if not rows:
        raise InvalidParameter(
            f"{param}: {given!r} is not in this model's vocabulary (give id:N, text:EXACT, a word such as "
            f"Paris for both 'Paris' and ' Paris', or ' Paris' for the space-marked token alone)"
        )
    return ResolvedToken(given=given, token_ids=[r[0] for r in rows], tokens=[r[1] for r in rows])
