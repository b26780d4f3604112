-- The replicator schema of the replica store, generated from replicator/store/tables.py
-- (python -m replicator.store.tables > schema/replicator.sql); a test keeps them equal.
CREATE SCHEMA IF NOT EXISTS replicator;
CREATE SCHEMA IF NOT EXISTS erp;
CREATE SCHEMA IF NOT EXISTS sf;
CREATE SCHEMA IF NOT EXISTS unified;
CREATE TABLE IF NOT EXISTS replicator.audit (
	id BIGSERIAL NOT NULL, 
	at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	kind TEXT NOT NULL, 
	subject TEXT, 
	detail JSONB NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_audit_at ON replicator.audit (at);
CREATE TABLE IF NOT EXISTS replicator.checkpoint_history (
	id BIGSERIAL NOT NULL, 
	stream TEXT NOT NULL, 
	position TEXT NOT NULL, 
	lsn BIGINT, 
	system_identifier TEXT, 
	timeline INTEGER, 
	slot_name TEXT, 
	reason TEXT NOT NULL, 
	changes BIGINT DEFAULT 0 NOT NULL, 
	recorded_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_replicator_checkpoint_history_stream ON replicator.checkpoint_history (stream);
CREATE TABLE IF NOT EXISTS replicator.checkpoints (
	stream TEXT NOT NULL, 
	position TEXT NOT NULL, 
	lsn BIGINT, 
	system_identifier TEXT, 
	timeline INTEGER, 
	slot_name TEXT, 
	details JSONB DEFAULT '{}'::jsonb NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (stream)
);
CREATE TABLE IF NOT EXISTS replicator.conflicts (
	id BIGSERIAL NOT NULL, 
	entity TEXT NOT NULL, 
	entity_key TEXT NOT NULL, 
	field TEXT NOT NULL, 
	kept_value TEXT, 
	kept_source TEXT, 
	kept_time TIMESTAMP WITH TIME ZONE, 
	discarded_value TEXT, 
	discarded_source TEXT, 
	discarded_time TIMESTAMP WITH TIME ZONE, 
	rule TEXT NOT NULL, 
	recorded_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE IF NOT EXISTS replicator.created_links (
	entity TEXT NOT NULL, 
	target TEXT NOT NULL, 
	key TEXT NOT NULL, 
	unified_id TEXT NOT NULL, 
	at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (entity, target, key)
);
CREATE TABLE IF NOT EXISTS replicator.dead_letters (
	id BIGSERIAL NOT NULL, 
	stream TEXT NOT NULL, 
	entity TEXT NOT NULL, 
	source_key TEXT, 
	position TEXT, 
	reason TEXT NOT NULL, 
	payload JSONB, 
	status TEXT DEFAULT 'parked' NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE IF NOT EXISTS replicator.mirror_tables (
	stream TEXT NOT NULL, 
	source_table TEXT NOT NULL, 
	mirror_table TEXT NOT NULL, 
	columns JSONB NOT NULL, 
	key_columns JSONB NOT NULL, 
	loaded_at TIMESTAMP WITH TIME ZONE, 
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (stream, source_table)
);
CREATE TABLE IF NOT EXISTS replicator.outbox (
	id BIGSERIAL NOT NULL, 
	entity TEXT NOT NULL, 
	target TEXT NOT NULL, 
	target_key TEXT NOT NULL, 
	operation TEXT NOT NULL, 
	fields JSONB NOT NULL, 
	cause JSONB, 
	status TEXT DEFAULT 'pending' NOT NULL, 
	attempts INTEGER DEFAULT 0 NOT NULL, 
	last_error TEXT, 
	answer JSONB, 
	echoed JSONB DEFAULT '{}'::jsonb NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	done_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_outbox_key ON replicator.outbox (entity, target, target_key);
CREATE INDEX IF NOT EXISTS ix_outbox_pending ON replicator.outbox (status, target, id);
CREATE INDEX IF NOT EXISTS ix_outbox_unified ON replicator.outbox (entity, target, (cause ->> 'unified_id'));
CREATE TABLE IF NOT EXISTS replicator.outbox_echoes (
	outbox_id BIGINT NOT NULL, 
	field TEXT NOT NULL, 
	at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (outbox_id, field)
);
CREATE TABLE IF NOT EXISTS replicator.replica_identity (
	id INTEGER DEFAULT 1 NOT NULL, 
	checkpoints_oid BIGINT NOT NULL, 
	system_identifier TEXT NOT NULL, 
	timeline INTEGER NOT NULL, 
	recorded_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE IF NOT EXISTS replicator.sync_entities (
	entity TEXT NOT NULL, 
	linked_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	details JSONB DEFAULT '{}'::jsonb NOT NULL, 
	PRIMARY KEY (entity)
);
CREATE TABLE IF NOT EXISTS unified.match_review (
	id BIGSERIAL NOT NULL, 
	entity TEXT NOT NULL, 
	side TEXT NOT NULL, 
	record_key TEXT NOT NULL, 
	record JSONB NOT NULL, 
	candidates JSONB NOT NULL, 
	rule INTEGER, 
	held TEXT[] NOT NULL, 
	status TEXT DEFAULT 'open' NOT NULL, 
	chosen TEXT, 
	decided_by TEXT, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	decided_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);
CREATE INDEX IF NOT EXISTS ix_match_review_open ON unified.match_review (entity, status);
