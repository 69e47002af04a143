//! rankpilot
