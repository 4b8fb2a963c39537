//! `switchyard demo`.

pub fn main() -> Result<(), String> {
    Ok(())
}
