"""The statements the PostgreSQL ledger's lanes send (agent/ledger/postgres.py,
agent/ledger/_pg_batch.py): each kind of request alone, or several of it as one
batch, whose answers come back one per request, in their order.
"""

# The columns of a batched state read (the request's fields for parameters).
STATE_MANY_COLUMNS = (
    "SELECT a.posted, a.held, a.closed,"
    " (SELECT count(*) FROM calls c WHERE c.account = k.id AND c.status != 'ended') AS live,"
    " (SELECT count(*) FROM attempts t WHERE t.account = k.id"
    "   AND t.allowed AND k.a_since IS NOT NULL AND t.at >= k.a_since) AS acc_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = k.id"
    "   AND t.allowed AND k.c_since IS NOT NULL AND t.destination = k.dest"
    "   AND t.at >= k.c_since) AS callee_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = k.id"
    "   AND t.allowed AND k.s_since IS NOT NULL AND t.at >= k.s_since) AS cps_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = k.id AND t.caller = k.caller"
    "   AND t.allowed AND k.h_since IS NOT NULL AND t.at >= k.h_since) AS hour_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = k.id AND t.caller = k.caller"
    "   AND t.allowed AND k.d_since IS NOT NULL AND t.at >= k.d_since) AS day_n,"
    " (SELECT s.reason FROM suspensions s WHERE s.account = k.id) AS suspended"
)
# One account's state: the row, the live count, every attempt count, the suspension.
STATE_ONE = (
    "SELECT a.posted, a.held, a.closed,"
    " (SELECT count(*) FROM calls c WHERE c.account = $1 AND c.status != 'ended')"
    "   AS live,"
    " (SELECT count(*) FROM attempts t WHERE t.account = $1"
    "   AND t.allowed AND $2::timestamptz IS NOT NULL AND t.at >= $2) AS acc_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = $1"
    "   AND t.allowed AND $3::timestamptz IS NOT NULL AND t.destination = $4"
    "   AND t.at >= $3) AS callee_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = $1"
    "   AND t.allowed AND $5::timestamptz IS NOT NULL AND t.at >= $5) AS cps_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = $1 AND t.caller = $6"
    "   AND t.allowed AND $7::timestamptz IS NOT NULL AND t.at >= $7) AS hour_n,"
    " (SELECT count(*) FROM attempts t WHERE t.account = $1 AND t.caller = $6"
    "   AND t.allowed AND $8::timestamptz IS NOT NULL AND t.at >= $8) AS day_n,"
    " (SELECT s.reason FROM suspensions s WHERE s.account = $1) AS suspended"
    " FROM (SELECT $1::text AS id) k LEFT JOIN accounts a ON a.id = k.id"
)
# The same for several requests, one row each, in their order (the columns with the
# request's fields for parameters).
STATE_MANY = (
    STATE_MANY_COLUMNS + " FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[],"
    " $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[], $8::timestamptz[])"
    " WITH ORDINALITY AS k(id, a_since, c_since, dest, s_since, caller, h_since, d_since, n)"
    " LEFT JOIN accounts a ON a.id = k.id ORDER BY k.n"
)
ADMIT_ONE = ("SELECT callgate_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
              " $14, $15, $16)")
ADMIT_MANY = ("SELECT callgate_admit_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
               " $13, $14, $15, $16)")
HOLD_ONE = "SELECT callgate_hold($1, $2, $3, $4, $5)"
HOLD_MANY = "SELECT callgate_hold_batch($1, $2, $3, $4, $5)"
SETTLE_ONE = ("SELECT * FROM callgate_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
               " $12, $13, $14, $15)")
SETTLE_MANY = ("SELECT b.n, (b.cdr).* FROM callgate_settle_batch($1, $2, $3, $4, $5, $6, $7,"
                " $8, $9, $10, $11, $12, $13, $14, $15) b")
