import java.lang.reflect.Proxy;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * Runs Dedup against an in-memory stand-in for a JDBC connection (java.lang.reflect.Proxy,
 * JDK only): given e-1 delivered twice and e-2 whose first handling fails, each effect
 * happens once. Prints "N passed, N failed"; exits 1 on a failure.
 */
public final class DedupCheck {
    static final Set<String> processed = new HashSet<>();
    static final List<String> orders = new ArrayList<>();
    static final List<String> pendingIds = new ArrayList<>();
    static final List<String> pendingOrders = new ArrayList<>();
    static int passed, failed;

    static Connection connection() {
        return (Connection) Proxy.newProxyInstance(DedupCheck.class.getClassLoader(), new Class<?>[] {Connection.class},
            (proxy, method, args) -> {
                switch (method.getName()) {
                    case "getAutoCommit": return true;
                    case "setAutoCommit": return null;
                    case "commit":
                        processed.addAll(pendingIds); orders.addAll(pendingOrders);
                        pendingIds.clear(); pendingOrders.clear();
                        return null;
                    case "rollback": pendingIds.clear(); pendingOrders.clear(); return null;
                    case "prepareStatement": return statement((String) args[0]);
                    default: throw new UnsupportedOperationException(method.getName());
                }
            });
    }

    static PreparedStatement statement(String sql) {
        String[] param = new String[1];
        return (PreparedStatement) Proxy.newProxyInstance(DedupCheck.class.getClassLoader(),
            new Class<?>[] {PreparedStatement.class}, (proxy, method, args) -> {
                switch (method.getName()) {
                    case "setString": param[0] = (String) args[1]; return null;
                    case "close": return null;
                    case "executeUpdate":
                        if (sql.startsWith("INSERT INTO processed_events")) {
                            if (processed.contains(param[0]) || pendingIds.contains(param[0])) return 0;
                            pendingIds.add(param[0]);
                            return 1;
                        }
                        if (sql.startsWith("INSERT INTO orders")) { pendingOrders.add(param[0]); return 1; }
                        throw new SQLException("unexpected statement: " + sql);
                    default: throw new UnsupportedOperationException(method.getName());
                }
            });
    }

    static void check(boolean ok, String what) {
        if (ok) passed++; else { failed++; System.out.println("FAIL " + what); }
    }

    static Dedup.Effect order(String subject) {
        return tx -> {
            try (PreparedStatement s = tx.prepareStatement("INSERT INTO orders (id) VALUES (?)")) {
                s.setString(1, subject);
                s.executeUpdate();
            }
        };
    }

    public static void main(String[] args) throws Exception {
        Connection db = connection();
        check(Dedup.handleOnce(db, "e-1", order("o-1")), "e-1 applied");
        check(!Dedup.handleOnce(db, "e-1", order("o-1")), "e-1 again is a duplicate");
        try {
            Dedup.handleOnce(db, "e-2", tx -> { throw new SQLException("transient"); });
            check(false, "a failing effect throws");
        } catch (SQLException expected) {
            check(true, "a failing effect throws");
        }
        check(Dedup.handleOnce(db, "e-2", order("o-2")), "e-2 applied on redelivery");
        check(orders.equals(List.of("o-1", "o-2")), "each effect once: " + orders);
        check(Dedup.eventId(Map.of("ce-id", "r%201/%C3%BC+%25"), null).equals("r 1/ü+%"), "NATS ce-id decoded");
        check(Dedup.eventId(Map.of("ce_id", "r 1/ü+%"), null).equals("r 1/ü+%"), "Kafka ce_id as is");
        check(Dedup.eventId(Map.of(), "{\"specversion\":\"1.0\",\"id\":\"e-3\"}").equals("e-3"), "structured id");
        System.out.println(passed + " passed, " + failed + " failed");
        System.exit(failed == 0 ? 0 : 1);
    }
}
