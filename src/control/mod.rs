pub mod admin;
pub mod reload;
