//! Log sequence numbers as text. A leaf: every layer prints LSNs the way Postgres does.

/// `X/Y` text of an LSN, as Postgres prints it (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    #[test]
    fn prints_as_postgres_does() {
        assert_eq!(super::lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::lsn_text(0), "0/0");
    }
}
