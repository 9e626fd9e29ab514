/* A Mosquitto 2 plugin that counts the publishes the broker refuses to a device, and tells the
 * supervisor, which cannot see them otherwise (Mosquitto logs a denied PUBLISH only at debug
 * level, with every other message).
 *
 * The broker's ACL file (appliance/broker.py) still decides. This plugin is asked first, for
 * every write, and knows the one rule it counts: a device user may publish to <base>/<user> and
 * <base>/<user>/availability only. Any other write by a device is refused here and counted;
 * everything else is deferred to the ACL file.
 *
 * Reports go to <base>/bridge/denied, at most one a second, as
 *   {"denied": [{"user": "plug1", "count": 3, "topic": "kalki/camera1"}, ...], "untracked": 0}
 * with the counts since the previous report and the last topic each user tried. A flood of
 * forged publishes costs the supervisor one message a second.
 *
 * Options: plugin_opt_base (the topic base), plugin_opt_supervisor (the user the rule does not
 * apply to).
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_USERS 64        /* devices tracked between two reports; the rest are "untracked" */
#define NAME_LEN 64
#define TOPIC_LEN 128
#define REPORT_LEN (MAX_USERS * (6 * NAME_LEN + 6 * TOPIC_LEN + 64) + 64)   /* all escaped */

struct tally {
	char user[NAME_LEN];
	char topic[TOPIC_LEN];
	unsigned long count;
};

static mosquitto_plugin_id_t *plugin_id;
static char base[NAME_LEN] = "kalki";
static char supervisor[NAME_LEN] = "kalki";
static char report_topic[NAME_LEN + 16];
static struct tally tallies[MAX_USERS];
static int tallied;
static unsigned long untracked;
static time_t last_report;
static char report[REPORT_LEN];

/* Copies at most size - 1 bytes, never cutting a UTF-8 character in two. */
static void copy_utf8(char *dst, const char *src, size_t size)
{
	size_t n = strlen(src);

	if (n >= size) {
		n = size - 1;
		while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80)
			n--;
	}
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Appends s as a JSON string; a topic may hold quotes, backslashes and control characters. */
static size_t put_json_string(char *out, size_t at, const char *s)
{
	out[at++] = '"';
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			out[at++] = '\\';
			out[at++] = (char)c;
		} else if (c < 0x20) {
			at += (size_t)sprintf(out + at, "\\u%04x", c);
		} else {
			out[at++] = (char)c;
		}
	}
	out[at++] = '"';
	return at;
}

static void send_report(time_t now)
{
	size_t at = 0;

	if (tallied == 0 && untracked == 0)
		return;
	at += (size_t)sprintf(report, "{\"denied\": [");
	for (int i = 0; i < tallied; i++) {
		at += (size_t)sprintf(report + at, "%s{\"user\": ", i ? ", " : "");
		at = put_json_string(report, at, tallies[i].user);
		at += (size_t)sprintf(report + at, ", \"count\": %lu, \"topic\": ", tallies[i].count);
		at = put_json_string(report, at, tallies[i].topic);
		report[at++] = '}';
	}
	at += (size_t)sprintf(report + at, "], \"untracked\": %lu}", untracked);
	mosquitto_broker_publish_copy(NULL, report_topic, (int)at, report, 1, false, NULL);
	tallied = 0;
	untracked = 0;
	last_report = now;
}

static void report_if_due(void)
{
	time_t now = time(NULL);

	if (now > last_report)
		send_report(now);
}

static void count(const char *user, const char *topic)
{
	int i;

	for (i = 0; i < tallied && strcmp(tallies[i].user, user) != 0; i++)
		;
	if (i == tallied) {
		if (tallied == MAX_USERS || strlen(user) >= NAME_LEN) {
			untracked++;
			return;
		}
		copy_utf8(tallies[i].user, user, NAME_LEN);
		tallies[i].count = 0;
		tallied++;
	}
	tallies[i].count++;
	copy_utf8(tallies[i].topic, topic, TOPIC_LEN);
}

/* <base>/<user> or <base>/<user>/availability */
static bool own_topic(const char *user, const char *topic)
{
	size_t b = strlen(base), u = strlen(user);

	if (strncmp(topic, base, b) != 0 || topic[b] != '/' || strncmp(topic + b + 1, user, u) != 0)
		return false;
	topic += b + 1 + u;
	return *topic == '\0' || strcmp(topic, "/availability") == 0;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *check = event_data;
	const char *user = mosquitto_client_username(check->client);

	(void)event;
	(void)userdata;
	if (check->access != MOSQ_ACL_WRITE || user == NULL || strcmp(user, supervisor) == 0
	    || own_topic(user, check->topic))
		return MOSQ_ERR_PLUGIN_DEFER;
	count(user, check->topic);
	report_if_due();
	return MOSQ_ERR_ACL_DENIED;
}

/* Mosquitto 2.0 calls this from its main loop, without filling in the event's times. */
static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	report_if_due();
	return MOSQ_ERR_SUCCESS;
}


int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for (int i = 0; i < supported_version_count; i++)
		if (supported_versions[i] == 5)
			return 5;
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
			  struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	for (int i = 0; i < option_count; i++) {
		char *value = NULL;

		if (strcmp(options[i].key, "base") == 0)
			value = base;
		else if (strcmp(options[i].key, "supervisor") == 0)
			value = supervisor;
		if (value == NULL || strlen(options[i].value) >= NAME_LEN) {
			mosquitto_log_printf(MOSQ_LOG_ERR, "kalki_denials: bad option %s", options[i].key);
			return MOSQ_ERR_INVAL;
		}
		strcpy(value, options[i].value);
	}
	snprintf(report_topic, sizeof(report_topic), "%s/bridge/denied", base);
	plugin_id = identifier;
	if (mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
	    || mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL))
		return MOSQ_ERR_UNKNOWN;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	return MOSQ_ERR_SUCCESS;
}
