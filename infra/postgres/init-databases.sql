-- Runs once, on an empty data volume (the postgres image's /docker-entrypoint-initdb.d hook).
-- POSTGRES_DB creates the `mlflow` database; Prefect gets its own so the two schemas never meet.
CREATE DATABASE prefect;
