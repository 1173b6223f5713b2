-- Five wrong PINs in one pairing window hold the account that entered them, for that dongle, until an
-- administrator clears it (force-unpair). Before, they put the dongle itself on SECURITY_HOLD for
-- everybody: anyone whose agent saw an unclaimed dongle (on a shared LAN, say) could lock out whoever
-- holds it. The dongle's own cool-down after five wrong PINs (five minutes) still applies to all.
CREATE TABLE pairing_holds (
    dongle_id   uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    reason      text NOT NULL CHECK (length(reason) BETWEEN 1 AND 64),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dongle_id, user_id)
);
