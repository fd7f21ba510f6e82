import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Applies each outboxd event once, although at-least-once delivery may bring it twice
 * (after a relay crash, a replay, a slot recovery, or a redelivery of an unacknowledged
 * message).
 *
 * <p>The effect and the record of the event's CloudEvent id commit in one database
 * transaction; the message is acknowledged to the broker only after that commit. A
 * crash in between means a redelivery, which the recorded id makes a no-op.
 *
 * <p>JDK only: java.sql with the PostgreSQL JDBC driver, and any NATS or Kafka client,
 * whose message headers go to {@link #eventId}.
 *
 * <pre>CREATE TABLE processed_events (id text PRIMARY KEY, processed_at timestamptz NOT NULL DEFAULT now());</pre>
 */
public final class Dedup {
    private Dedup() {}

    /** The effect of one event, run inside the transaction that records its id. */
    @FunctionalInterface
    public interface Effect {
        void apply(Connection tx) throws SQLException;
    }

    private static final Pattern STRUCTURED_ID = Pattern.compile("\"id\"\\s*:\\s*\"((?:[^\"\\\\]|\\\\.)*)\"");

    /**
     * The CloudEvent id of a message from outboxd. NATS binary mode: the "ce-id" header,
     * percent-encoded by the CloudEvents HTTP rule, so it is decoded ('+' stays '+', so
     * not URLDecoder). Kafka binary mode: the "ce_id" header as is. Structured mode: the
     * "id" member of the JSON body (use your JSON library; the pattern keeps this
     * example free of dependencies and handles ids without escapes).
     */
    public static String eventId(Map<String, String> headers, String body) {
        if (headers != null && headers.containsKey("ce-id")) {
            return percentDecode(headers.get("ce-id"));
        }
        if (headers != null && headers.containsKey("ce_id")) {
            return headers.get("ce_id");
        }
        Matcher m = STRUCTURED_ID.matcher(body == null ? "" : body);
        if (!m.find()) {
            throw new IllegalArgumentException("no ce-id/ce_id header and no id in the body");
        }
        return m.group(1);
    }

    static String percentDecode(String s) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] in = s.getBytes(StandardCharsets.UTF_8);
        for (int i = 0; i < in.length; i++) {
            if (in[i] == '%' && i + 2 < in.length) {
                out.write(Integer.parseInt(new String(in, i + 1, 2, StandardCharsets.US_ASCII), 16));
                i += 2;
            } else {
                out.write(in[i]);
            }
        }
        return out.toString(StandardCharsets.UTF_8);
    }

    /**
     * Runs the effect and records the id in one transaction, unless the id was recorded
     * before. Returns whether the effect ran. When it throws, nothing is recorded: do
     * not acknowledge the message, and it comes again.
     */
    public static boolean handleOnce(Connection db, String id, Effect effect) throws SQLException {
        boolean autoCommit = db.getAutoCommit();
        db.setAutoCommit(false);
        try (PreparedStatement insert = db.prepareStatement(
                "INSERT INTO processed_events (id) VALUES (?) ON CONFLICT DO NOTHING")) {
            insert.setString(1, id);
            if (insert.executeUpdate() == 0) {
                db.rollback();
                return false; // a duplicate: acknowledge it, do nothing
            }
            effect.apply(db);
            db.commit();
            return true;
        } catch (SQLException | RuntimeException e) {
            db.rollback();
            throw e;
        } finally {
            db.setAutoCommit(autoCommit);
        }
    }
}
