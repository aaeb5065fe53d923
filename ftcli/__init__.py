"""ftcli: declarative parameter-efficient fine-tuning from YAML recipes."""
