from sqlalchemy import text
from catalog.store.database import get_engine

def test_scratch(migrated_db):
    eng = get_engine(migrated_db)
    with eng.connect() as c:
        v = "[0.123456789,0.987654321]"
        print(c.execute(text("SELECT CAST(:v AS halfvec(2))::text, CAST(:v AS vector)::text"), {"v": v}).one())
        print(c.execute(text("SELECT CAST(:v AS vector)::text, CAST(:v AS halfvec(2))::text"), {"v": v}).one())
        print(c.execute(text("SELECT CAST(:v AS vector)::text"), {"v": v}).one())
