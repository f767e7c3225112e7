"""Start the vla_runtime policy node: `ros2 launch vla_runtime policy.launch.py [preset:=pi05] ...`.

Written to the launch / launch_ros API of ROS 2 Jazzy. The parameters file (default: this package's
config/policy.yaml) is applied first; the launch arguments below override it.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("vla_runtime"), "config", "policy.yaml")
    arguments = [
        DeclareLaunchArgument(
            "namespace", default_value="", description="Namespace of the node and its topics"
        ),
        DeclareLaunchArgument("params_file", default_value=default_params, description="Parameters YAML"),
        DeclareLaunchArgument(
            "preset", default_value="pi05_tiny", description="pi0 | pi05 | pi0_tiny | pi05_tiny"
        ),
        DeclareLaunchArgument(
            "checkpoint", default_value="", description="Checkpoint directory; empty = random"
        ),
        DeclareLaunchArgument("device", default_value="cpu", description="cpu | cuda | cuda:N"),
        DeclareLaunchArgument(
            "precision", default_value="float32", description="float32 | bf16 | fp8 (prefix GEMMs in FP8)"
        ),
        DeclareLaunchArgument(
            "fp8_expert", default_value="false", description="With fp8: the action expert's GEMMs in FP8 too"
        ),
        DeclareLaunchArgument("rate_hz", default_value="20.0", description="Control rate in Hz"),
    ]
    policy_node = Node(
        package="vla_runtime",
        executable="policy_node",
        name="policy_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "preset": LaunchConfiguration("preset"),
                "checkpoint": LaunchConfiguration("checkpoint"),
                "device": LaunchConfiguration("device"),
                "precision": LaunchConfiguration("precision"),
                "fp8_expert": ParameterValue(LaunchConfiguration("fp8_expert"), value_type=bool),
                "rate_hz": ParameterValue(LaunchConfiguration("rate_hz"), value_type=float),
            },
        ],
    )
    return LaunchDescription([*arguments, policy_node])
