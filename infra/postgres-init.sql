-- The MLflow backend store lives next to Prefect's database in the same Postgres.
CREATE DATABASE mlflow OWNER transferlab;
